"""Running one step (one MCP call) and closing a run: the logic behind the two Celery tasks."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from orchestrator.errors import OrchestratorError, TransportError
from orchestrator.expressions import render
from orchestrator.results import StepError, StepResult
from workers.runtime import Runtime


@dataclass(frozen=True)
class StepCall:
    """What a task message carries for one step: ids, service, tool, arguments — no connection details."""

    run_id: str
    step_id: str
    service: str
    tool: str
    arguments: dict[str, Any]
    timeout: float
    retries: int
    depends_on: list[str] = field(default_factory=list)
    reads: list[str] = field(default_factory=list)


def execute_step(runtime: Runtime, call: StepCall, worker: str | None) -> StepResult:
    """Run a step unless the run was cancelled or an upstream step did not succeed; record the outcome."""
    store = runtime.store
    status, params, records = store.inputs(call.run_id, {*call.depends_on, *call.reads})
    result = StepResult(service=call.service, tool=call.tool, worker=worker)
    blocked = [dep for dep in call.depends_on if dep not in records or records[dep].status != "succeeded"]
    if status == "cancelled":
        result.status = "cancelled"
    elif blocked:
        result.status, result.error = "skipped", f"upstream step '{blocked[0]}' {records[blocked[0]].status}"
    else:
        context = {
            "params": params,
            "steps": {sid: r.model_dump(include={"output", "status"}) for sid, r in records.items()},
        }
        result = _call(runtime, call, context, result)
    store.save_step(call.run_id, call.step_id, result)
    return result


def _call(runtime: Runtime, call: StepCall, context: dict[str, Any], result: StepResult) -> StepResult:
    server = runtime.config.services[call.service].server
    started = time.time()
    running = result.model_copy(update={"status": "running", "started_at": started})
    runtime.store.save_step(call.run_id, call.step_id, running)
    attempts = 0

    async def attempt() -> Any:
        nonlocal attempts
        attempts += 1
        arguments = render(call.arguments, context)
        return await runtime.pool.call_tool(server, call.tool, arguments, call.timeout)

    async def with_retries() -> Any:
        retrying = AsyncRetrying(
            stop=stop_after_attempt(call.retries + 1),
            wait=wait_random_exponential(multiplier=0.2, max=10),
            retry=retry_if_exception(lambda exc: isinstance(exc, TransportError)),
            reraise=True,
        )
        return await retrying(attempt)

    finished = running.model_copy()
    try:
        finished.output = runtime.pool.run(with_retries())
        finished.status = "succeeded"
    except OrchestratorError as exc:
        finished.status, finished.error, finished.error_type = "failed", str(exc), type(exc).__name__
    except Exception as exc:  # boundary: a step records any failure instead of breaking the canvas
        finished.status, finished.error, finished.error_type = (
            "failed",
            f"{type(exc).__name__}: {exc}",
            type(exc).__name__,
        )
    finished.attempts = attempts
    finished.finished_at = time.time()
    finished.duration_ms = round((finished.finished_at - started) * 1000, 3)
    return finished


def finish_run(runtime: Runtime, run_id: str) -> str:
    """Aggregate a run's steps into its status, output and errors; returns the final status."""
    run = runtime.store.load(run_id)
    plan = runtime.store.plan(run_id)
    errors = [
        StepError(
            step=sid,
            service=s.service,
            tool=s.tool,
            type=s.error_type or s.status,
            message=s.error or "",
            attempts=s.attempts,
        )
        for sid, s in run.steps.items()
        if s.status == "failed"
    ]
    status = "succeeded" if all(s.status == "succeeded" for s in run.steps.values()) else "failed"
    context = {
        "params": run.params,
        "steps": {sid: s.model_dump(include={"output", "status"}) for sid, s in run.steps.items()},
    }
    if plan.get("output") is not None:
        try:
            output = render(plan["output"], context, "output")
        except OrchestratorError as exc:
            output, status = None, "failed"
            errors.append(StepError(step="output", service="", tool="", type=type(exc).__name__, message=str(exc)))
    else:
        output = {sid: run.steps[sid].output for sid in plan["sinks"] if run.steps[sid].status == "succeeded"}
    return runtime.store.finish(run_id, status, output, errors)
