"""The Celery tasks: `mcpo.call` makes one MCP tool call, `mcpo.batch` several at once, `mcpo.finish` closes a run."""

from __future__ import annotations

from typing import Any

from celery import Task
from celery.canvas import maybe_signature

from orchestrator.errors import RunNotFound
from orchestrator.messages import StepCall
from workers import runtime
from workers.app import app, step_signature
from workers.execution import execute_batch, execute_step, finish_run
from workers.pipeline import Reroute, Retry
from workers.request import DecodedRequest

BATCH_RETRIES = 5  # times a batch's unrecorded calls go round again before the batch fails


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


@app.task(name="mcpo.batch", bind=True, max_retries=BATCH_RETRIES, ignore_result=True, Request=DecodedRequest)
def batch(self: Task, calls: list[dict[str, Any]], caller: str | None = None) -> dict[str, Any]:
    """Calls of one run to one service made at once (orchestrator/batching.py); shown as `service.tool` times N. A call
    that must retry or go to its fallback leaves the batch: it is sent alone, and the chord waits for it too."""
    steps = [StepCall(**message, caller=caller) for message in calls]
    outcomes = execute_batch(runtime.current(), steps, self.request.hostname)
    statuses: dict[str, str] = {}
    unrecorded: list[dict[str, Any]] = []
    for step, message, outcome in zip(steps, calls, outcomes, strict=True):
        if isinstance(outcome, Retry | Reroute):
            alone = self.add_to_chord(step_signature(outcome.call), lazy=True)
            alone.apply_async(countdown=outcome.countdown if isinstance(outcome, Retry) else None)
            statuses[step.step_id] = "left the batch"
        elif isinstance(outcome, RunNotFound):
            statuses[step.step_id] = "no such run"  # dropped, as a call alone is
        elif isinstance(outcome, Exception):
            unrecorded.append(message)
        else:
            statuses[step.step_id] = outcome.status
    if unrecorded:
        # Not even a failure could be recorded (Redis refused): those calls go round again, as a batch of their own
        # under this task's id, so the chord still counts it once; a call recorded meanwhile is not made again.
        raise self.retry(kwargs={"calls": unrecorded, "caller": caller}, countdown=1.0)
    return {"steps": statuses}


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
