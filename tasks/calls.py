"""The two Celery tasks: `mcpo.call` makes one MCP tool call; `mcpo.finish` closes a run."""

from __future__ import annotations

from typing import Any

from celery import Task
from celery.canvas import maybe_signature

from orchestrator.messages import StepCall
from workers import runtime
from workers.app import app, step_signature
from workers.execution import execute_step, finish_run
from workers.pipeline import Reroute, Retry
from workers.request import DecodedRequest


# Results live in the run store; Celery's result backend is still told of chord members (Celery does that
# whatever ignore_result says), so ignoring results costs fan-ins nothing.
@app.task(name="mcpo.call", bind=True, max_retries=None, ignore_result=True, Request=DecodedRequest)
def call(self: Task, **message: Any) -> dict[str, Any]:
    """One MCP tool call; shown as `service.tool` in logs and Flower (the signature's shadow name)."""
    outcome = execute_step(runtime.current(), StepCall(**message), self.request.hostname)
    if isinstance(outcome, Retry):
        # Re-sent with a countdown: the backoff waits in the broker, not in a worker slot.
        raise self.retry(kwargs=outcome.call.message(), countdown=outcome.countdown, kwargsrepr=outcome.call.shown())
    if isinstance(outcome, Reroute):
        # The fallback service's queue takes the call, keeping its place in the canvas.
        raise self.replace(step_signature(outcome.call))
    _hand_on(self.request.chain, message.get("caller"))
    return {"step": message["step_id"], "status": outcome.status}


def _hand_on(chain: list[dict[str, Any]] | None, caller: str | None) -> None:
    """Give the chain's next call this step's caller token: the compiler leaves it out of calls that follow a call
    (orchestrator/compiler.py), and Celery sends that next message once this task returns."""
    following = chain[-1] if chain else None
    if caller and following and following.get("task") == "mcpo.call":
        following["kwargs"].setdefault("caller", caller)


@app.task(name="mcpo.finish", bind=True, ignore_result=True, Request=DecodedRequest)
def finish(self: Task, run_id: str, after_fallback: str | None = None) -> str:
    """Aggregate a run once every step has ended; a failed run with a fallback workflow runs that first."""
    current = runtime.current()
    outcome = finish_run(current, run_id, after_fallback)
    if isinstance(outcome, str):
        return outcome
    _, canvas = outcome
    raise self.replace(maybe_signature(canvas, app=app))


@app.task(name="mcpo.health", Request=DecodedRequest)
def health(service: str) -> dict[str, dict[str, Any]]:
    """A health beat for every instance of a service, run on the service's own queue: liveness, latency
    and tools recorded in Redis, and each instance's breaker fed."""
    return {name: h.model_dump(exclude_none=True) for name, h in runtime.current().check(service).items()}
