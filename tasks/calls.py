"""The two Celery tasks: `mcpo.call` makes one MCP tool call; `mcpo.finish` closes a run."""

from __future__ import annotations

from typing import Any

from celery import Task

from workers import runtime
from workers.app import app
from workers.execution import StepCall, execute_step, finish_run


@app.task(name="mcpo.call", bind=True)
def call(self: Task, **message: Any) -> dict[str, Any]:
    """One MCP tool call; shown as `service.tool` in logs and Flower (the signature's shadow name)."""
    result = execute_step(runtime.current(), StepCall(**message), self.request.hostname)
    return {"step": message["step_id"], "status": result.status}


@app.task(name="mcpo.finish")
def finish(run_id: str) -> str:
    """Aggregate a run once every step has ended (the chord callback of a final fan-out)."""
    return finish_run(runtime.current(), run_id)
