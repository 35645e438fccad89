"""The two Celery tasks: `mcpo.call` makes one MCP tool call; `mcpo.finish` closes a run."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from celery import Task

from workers import runtime
from workers.app import app, queue_for
from workers.execution import Reroute, Retry, StepCall, execute_step, finish_run


@app.task(name="mcpo.call", bind=True, max_retries=None)
def call(self: Task, **message: Any) -> dict[str, Any]:
    """One MCP tool call; shown as `service.tool` in logs and Flower (the signature's shadow name)."""
    outcome = execute_step(runtime.current(), StepCall(**message), self.request.hostname)
    if isinstance(outcome, Retry):
        # Re-sent with a countdown: the backoff waits in the broker, not in a worker slot.
        raise self.retry(kwargs=asdict(outcome.call), countdown=outcome.countdown)
    if isinstance(outcome, Reroute):
        # The fallback service's queue takes the call, keeping its place in the canvas.
        raise self.replace(step_signature(outcome.call))
    return {"step": message["step_id"], "status": outcome.status}


@app.task(name="mcpo.finish")
def finish(run_id: str) -> str:
    """Aggregate a run once every step has ended (the chord callback of a final fan-out)."""
    return finish_run(runtime.current(), run_id)


def step_signature(step: StepCall) -> Any:
    """The signature of one step's call, routed to its service's queue and named `service.tool`."""
    return call.signature(kwargs=asdict(step), immutable=True, queue=queue_for(step.service),
                          shadow=f"{step.service}.{step.tool}")  # fmt: skip
