"""Running one step (one MCP call) and closing a run: the logic behind the two Celery tasks.

A step is marked running as its inputs are read, gated on them, then called (one attempt after another) on the
instance the pipeline places it on; what to do before a call, after each attempt and after a failure, and what
to write with the result, is the call pipeline's to say (workers/pipeline.py, and the policies in
workers/policies/, in the one order its `__init__.py` writes).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from orchestrator import scripts
from orchestrator.errors import (
    Cancelled,
    OrchestratorError,
    PermissionDenied,
    RunNotFound,
)
from orchestrator.expressions import render, truthy
from orchestrator.history.events import digest
from orchestrator.idempotency import call_meta
from orchestrator.messages import StepCall
from orchestrator.results import SATISFIED, TERMINAL_STEP, AttemptError, StepError, StepResult
from orchestrator.security.sealing import open_params, open_result, open_run, seal_errors, sealer
from workers.pipeline import AGAIN, SETTLED, Attempt, Outcome, Reroute, Retry

# Type hints only: the runtime brings the MCP SDK (its session pool), which a worker has already (tasks.calls
# imports it).
if TYPE_CHECKING:
    from workers.runtime import Runtime

log = logging.getLogger(__name__)


def execute_step(runtime: Runtime, call: StepCall, worker: str | None) -> Outcome:
    """Run a step's call unless it must not run; record what happened, or say how to go on.

    Whatever breaks is recorded as the step's failure, so the canvas goes on and the run ends: a task that raised
    would stop its chain, and the run would wait for ever. Only a message for no known run is dropped with its
    error (recording it would create the run's keys)."""
    try:
        return _execute(runtime, call, worker)
    except RunNotFound:
        raise
    except Exception as exc:  # boundary: see above
        # A sensitive step's traceback may quote what it holds: its type alone goes to the log.
        log.error("run %s step %s: %s", call.run_id, call.step_id, type(exc).__name__, exc_info=not call.sensitive)
        return _failed(runtime, call, worker, f"{type(exc).__name__}: {exc}", type(exc).__name__)


def execute_batch(runtime: Runtime, calls: list[StepCall], worker: str | None) -> list[Outcome | Exception]:
    """A batch message's calls (orchestrator/batching.py), made at once on the worker's shared threads; each
    call's outcome as `execute_step` gives it, or what it raised (its outcome could not be recorded)."""
    running = [runtime.threads.submit(_outcome, runtime, call, worker) for call in calls]
    return [future.result() for future in running]


def _outcome(runtime: Runtime, call: StepCall, worker: str | None) -> Outcome | Exception:
    try:
        return execute_step(runtime, call, worker)
    except Exception as exc:  # boundary: the batch decides what becomes of a call whose outcome was not recorded
        return exc


def _execute(runtime: Runtime, call: StepCall, worker: str | None) -> Outcome:
    pipeline = runtime.pipeline
    refusal = pipeline.refusal(call)
    if refusal is not None:  # no MCP traffic leaves
        return _failed(runtime, call, worker, refusal, PermissionDenied.__name__)
    call = pipeline.starting(call)
    original = call.fallback_for or {"service": call.service, "tool": call.tool}
    result = StepResult(service=original["service"], tool=original["tool"], worker=worker, started_at=call.started_at)
    attempt = Attempt({}, result)
    # The step is marked running in the same round trip that reads its inputs (and that the policies' reads join);
    # a step the gate then stops overwrites the mark with why.
    mark = (call.step_id, result.model_copy(update={"status": "running"})) if call.attempt == 0 else None
    pipe = runtime.store.redis.pipeline(transaction=False)
    read = pipeline.reading(call, pipe, attempt)
    steps = {*call.depends_on, *call.reads, call.step_id}
    status, params, records, replies = runtime.store.inputs(call.run_id, steps, mark, pipe)
    read(replies)
    previous = records.pop(call.step_id, None)
    try:
        if previous is not None and previous.status in TERMINAL_STEP:  # delivered again after its call was recorded
            return previous
        return _run(runtime, call, attempt, status, params, records)
    finally:
        pipeline.done(call, attempt)


def _run(runtime: Runtime, call: StepCall, attempt: Attempt, status: str, params: dict[str, Any],
         records: dict[str, StepResult]) -> Outcome:  # fmt: skip
    """Gate the step on its inputs, then make its attempts and record the result."""
    result = attempt.result
    if call.opens:
        params, records = open_params(params), {sid: open_result(r) for sid, r in records.items()}
    context = {
        "params": params,
        "steps": {sid: r.model_dump(include={"output", "status"}) for sid, r in records.items()},
    }
    verdict = _gate(call, status, records, context)
    if verdict is not None:
        result.status, result.skip_reason, result.error = verdict
        _record(runtime, call, result, attempt)
        return result
    try:
        outcome = _attempt(runtime, call, context, attempt)
    except Exception as exc:  # boundary: a step records any failure instead of breaking the canvas
        result.status, result.error, result.error_type = "failed", f"{type(exc).__name__}: {exc}", type(exc).__name__
        outcome = _finished(result, call, False)
    if isinstance(outcome, StepResult):
        outcome = runtime.pipeline.finishing(call, outcome)
        _record(runtime, call, outcome, attempt)
    return outcome


def _record(runtime: Runtime, call: StepCall, result: StepResult, attempt: Attempt) -> None:
    """The step's final result, recorded in one round trip with what the policies write beside it."""
    pipe = runtime.store.redis.pipeline(transaction=False)
    runtime.pipeline.recording(call, result, pipe, attempt)
    scripts.execute(pipe)


def _failed(runtime: Runtime, call: StepCall, worker: str | None, error: str, error_type: str) -> StepResult:
    """Record the step as failed, with why. A message for no known run is dropped with the error instead
    (recording it would create a run's keys)."""
    runtime.store.status(call.run_id)  # raises RunNotFound
    now = time.time()
    started = call.started_at or now
    result = StepResult(service=call.service, tool=call.tool, worker=worker, status="failed", error=error,
                        error_type=error_type, started_at=started, finished_at=now,
                        duration_ms=round((now - started) * 1000, 3))  # fmt: skip
    _record(runtime, call, runtime.pipeline.finishing(call, result), Attempt({}, result))
    return result


def _gate(call: StepCall, status: str, records: dict[str, StepResult], context: dict[str, Any]) -> Any:
    """(status, skip reason, message) when the step must not run, else None."""
    if status == "cancelled":
        return "cancelled", None, "the run was cancelled before this step started"
    deps = [records.get(d) for d in call.depends_on]
    for dep_id, dep in zip(call.depends_on, deps, strict=True):
        if dep is None or dep.status in ("failed", "cancelled") or dep.skip_reason == "upstream":
            return "skipped", "upstream", f"upstream step '{dep_id}' {dep.status if dep else 'is missing'}"
    if deps and all(dep is not None and dep.skip_reason == "condition" for dep in deps):
        return "skipped", "condition", "every step it depends on was skipped by its condition"
    first_attempt = call.attempt == 0 and not call.fallback_for
    if first_attempt and call.when is not None and not truthy(render(call.when, context, "when")):
        return "skipped", "condition", f"condition is false: {call.when}"
    return None


def _attempt(runtime: Runtime, call: StepCall, context: dict[str, Any], attempt: Attempt) -> Outcome:
    """Make attempts until one succeeds, a backoff is due, or the failure is final."""
    pipeline, result = runtime.pipeline, attempt.result
    while True:
        result.instance = None
        began = time.monotonic()
        try:
            attempt.arguments = render(sealer().open(call.arguments) if call.sensitive else call.arguments, context)
            result.arguments_digest = (
                sealer().digest(attempt.arguments) if call.sensitive else digest(attempt.arguments)
            )
            if pipeline.answer(call, attempt) is SETTLED:  # answered without a call (the response cache)
                return _finished(result, call, False)
            result.instance = pipeline.place(call, attempt)  # a breaker may refuse the attempt: no call is made
            # The session is opened first, so that no slot a limit gives the call is spent on its start-up.
            runtime.pool.ready(result.instance, max(0.001, call.deadline - time.time()))
            pipeline.admit(call, attempt)  # so may a limit
            result.output = _call(runtime, call, result.instance, attempt.arguments)
        except Exception as exc:
            pipeline.attempted(call, attempt, exc, time.monotonic() - began)
            if not isinstance(exc, OrchestratorError):
                raise
            if (retry := pipeline.refused(call, exc)) is not None:  # no call was made: not an attempt
                return retry
            call = _failed_attempt(call, result.instance or "", exc)
            decision = None if isinstance(exc, Cancelled) else pipeline.failed(call, exc, attempt)
            if decision is AGAIN:
                continue
            if isinstance(decision, Retry | Reroute):
                return decision
            return _settled(call, result, exc, decision is SETTLED)
        pipeline.attempted(call, attempt, None, time.monotonic() - began)
        result.status = "succeeded"
        if call.fallback_for:
            result.served_by = f"{call.service}.{call.tool}"
        pipeline.succeeded(call, attempt)
        return _finished(result, call, True)


def _call(runtime: Runtime, call: StepCall, instance: str, arguments: dict[str, Any]) -> Any:
    """The MCP call itself, on the instance placed, within what is left of the step's budget."""
    budget = max(0.001, call.deadline - time.time())
    # The same key on every attempt, retry and redelivery: a server with effects can dedupe on it.
    meta = call_meta(call.run_id, call.step_id)
    return runtime.pool.run(runtime.pool.call_tool(instance, call.tool, arguments, budget, meta), key=call.run_id)


def _failed_attempt(call: StepCall, instance: str, exc: OrchestratorError) -> StepCall:
    # A sensitive call's errors may quote its arguments, and its next attempt's message carries them: sealed.
    message = sealer().seal(str(exc)) if call.sensitive else str(exc)
    error = AttemptError(attempt=call.attempt + 1, service=call.service, instance=instance, type=type(exc).__name__,
                         message=message, at=time.time())  # fmt: skip
    return replace(call, attempt=call.attempt + 1, attempt_errors=[*call.attempt_errors, error.model_dump()])


def _settled(call: StepCall, result: StepResult, exc: OrchestratorError, by_policy: bool) -> StepResult:
    """The call failed for good: cancelled, or failed unless a policy settled it (stale, degraded)."""
    result.error, result.error_type = str(exc), type(exc).__name__
    if isinstance(exc, Cancelled):
        result.status = "cancelled"
    elif not by_policy:
        result.status = "failed"
    return _finished(result, call, False)


def _finished(result: StepResult, call: StepCall, succeeded: bool) -> StepResult:
    result.attempts = len(call.attempt_errors) + int(succeeded)
    result.attempt_errors = [AttemptError.model_validate(e) for e in call.attempt_errors]
    result.finished_at = time.time()
    result.started_at = call.started_at or result.finished_at
    result.duration_ms = round((result.finished_at - result.started_at) * 1000, 3)
    return result


def finish_run(runtime: Runtime, run_id: str, after_fallback: str | None = None) -> str | tuple[str, dict[str, Any]]:
    """Close a run: its status, output and errors from its steps; returns the final status.

    A failed run whose workflow names a fallback workflow is not closed: the fallback starts as a run of
    its own (returned as its id and canvas), and closes this one when it ends (`after_fallback`).
    """
    status, output, errors, summary = _aggregate(runtime, run_id)
    if status == "failed" and after_fallback is None and (child := _start_fallback(runtime, run_id)):
        return child
    final = runtime.store.finish(run_id, status, output, errors, summary)
    if after_fallback is not None:
        _, _, replaced_errors, replaced_summary = _aggregate(runtime, after_fallback)
        handled = "fallback-workflow" if final == "succeeded" else None
        errors = [error.model_copy(update={"handled_by": handled}) for error in replaced_errors]
        runtime.store.finish(after_fallback, final, output, errors, replaced_summary)
    return final


def _aggregate(runtime: Runtime, run_id: str) -> tuple[str, Any, list[StepError], dict[str, dict[str, int]]]:
    run = runtime.store.load(run_id)
    plan = runtime.store.plan(run_id)
    if plan.get("sensitive"):
        run = open_run(run)
    errors = [error for step_id, step in run.steps.items() if (error := _step_error(step_id, step))]
    ok = all(s.status in SATISFIED or s.skip_reason == "condition" for s in run.steps.values())
    status = "succeeded" if ok else "failed"
    output: Any = None
    if plan.get("output") is not None:
        context = {
            "params": run.params,
            "steps": {sid: s.model_dump(include={"output", "status"}) for sid, s in run.steps.items()},
        }
        try:
            output = render(plan["output"], context, "output")
        except OrchestratorError as exc:
            status = "failed"
            errors.append(StepError(step="output", service="", tool="", type=type(exc).__name__, message=str(exc)))
    else:
        output = {sid: run.steps[sid].output for sid in plan["sinks"] if run.steps[sid].status in SATISFIED}
    if plan.get("sensitive"):  # what was opened to aggregate is sealed again before it is stored
        output, errors = sealer().seal(output), seal_errors(errors)
    return status, output, errors, _error_summary(run.steps)


def _start_fallback(runtime: Runtime, run_id: str) -> tuple[str, dict[str, Any]] | None:
    fallback = runtime.store.plan(run_id).get("fallback")
    if not fallback:
        return None
    runtime.store.write(fallback["run_id"], fallback["records"])
    runtime.store.link_fallback(run_id, fallback["run_id"])
    return fallback["run_id"], fallback["canvas"]


def _step_error(step_id: str, step: StepResult) -> StepError | None:
    """The failure a step met, and how the run dealt with it; None for a step that had none."""
    handled = "fallback" if step.served_by else {"degraded": "degraded", "stale-cache": "stale-cache"}.get(step.status)
    if step.status != "failed" and handled is None:
        return None
    last = step.attempt_errors[-1] if step.attempt_errors else None
    return StepError(
        step=step_id, service=last.service if last else step.service, tool=step.tool,
        instance=last.instance if last else step.instance or "", type=step.error_type or (last.type if last else ""),
        message=step.error or (last.message if last else ""), attempts=step.attempts, handled_by=handled,
    )  # fmt: skip


def _error_summary(steps: dict[str, StepResult]) -> dict[str, dict[str, int]]:
    """Every failed attempt of the run, counted by service and error type."""
    summary: dict[str, dict[str, int]] = {}
    for step in steps.values():
        failures = [(a.service, a.type) for a in step.attempt_errors]
        if step.status == "failed" and not failures:
            failures = [(step.service, step.error_type or "Error")]
        for service, kind in failures:
            summary.setdefault(service, {}).setdefault(kind, 0)
            summary[service][kind] += 1
    return summary
