"""Running one step (one MCP call) and closing a run: the logic behind the two Celery tasks.

A step's failures are dealt with in the seed's order: an immediate retry for a transient network fault;
exponential backoff with full jitter for the next ones (the task is re-sent with a countdown, so no worker
slot waits); the circuit breaker refusing calls to an instance that keeps failing; the step's fallback
service (the call moves to that service's queue, keeping its place in the canvas); the last good answer
to the same call, if the step allows stale answers; and, for a step marked optional, degradation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from tenacity import RetryCallState, Retrying, wait_random_exponential

from orchestrator import scripts
from orchestrator.errors import (
    Cancelled,
    OrchestratorError,
    PermissionDenied,
    RunNotFound,
    ToolError,
    TransportError,
    Unavailable,
)
from orchestrator.events import digest
from orchestrator.expressions import render, truthy
from orchestrator.results import SATISFIED, AttemptError, StepError, StepResult
from orchestrator.sealing import open_params, open_result, open_run, seal_errors, seal_result, sealer

# Type hints only: the compiler imports StepCall in every process that enqueues, and the runtime brings the MCP
# SDK (its session pool), which only a worker needs — and a worker has it already (tasks.calls imports it).
if TYPE_CHECKING:
    from workers.balancer import Ask, Lease
    from workers.runtime import Runtime

log = logging.getLogger(__name__)
BACKOFF = wait_random_exponential(multiplier=0.5, max=30)  # full jitter: uniform in [0, min(30, 0.5 * 2^n)]


@dataclass(frozen=True)
class StepCall:
    """What a task message carries for one step: ids, service, tool, arguments — no connection details."""

    run_id: str
    step_id: str
    service: str
    tool: str
    arguments: dict[str, Any] | str  # a sensitive step's are sealed (orchestrator/sealing.py)
    timeout: float
    retries: int
    depends_on: list[str] = field(default_factory=list)
    reads: list[str] = field(default_factory=list)
    when: str | None = None
    optional: bool = False
    use_stale: float | None = None
    retry_tool_errors: bool = False
    fallback: dict[str, Any] | None = None  # {service, tool, arguments, timeout, retries}
    # Set as the call goes on: attempts made, when it began and its time budget ends, what it stands in for.
    attempt: int = 0
    started_at: float = 0.0
    deadline: float = 0.0
    attempt_errors: list[dict[str, Any]] = field(default_factory=list)
    fallback_for: dict[str, Any] | None = None  # {service, tool, arguments}: the call this one replaces
    caller: str | None = None  # the run's caller token (access control on): checked before any MCP traffic
    sensitive: bool = False  # arguments sealed; the worker seals the output and errors too
    opens: bool = False  # the run holds sealed data (params, outputs of sensitive steps) that this step may read

    def message(self) -> dict[str, Any]:
        """The task message's kwargs: fields left at their defaults are left out, since a chain's first
        message carries every later step's message too."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != _default(f)}


def _default(spec: Any) -> Any:
    return spec.default_factory() if spec.default_factory is not MISSING else spec.default


@dataclass(frozen=True)
class Retry:
    """Send the call again after `countdown` seconds."""

    call: StepCall
    countdown: float


@dataclass(frozen=True)
class Reroute:
    """Hand the call to another service's queue (the step's fallback)."""

    call: StepCall


Outcome = StepResult | Retry | Reroute


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


def _execute(runtime: Runtime, call: StepCall, worker: str | None) -> Outcome:
    store = runtime.store
    refusal = runtime.guard.refusal(call) if runtime.guard is not None else None
    if refusal is not None:  # no MCP traffic leaves
        return _failed(runtime, call, worker, refusal, PermissionDenied.__name__)
    call = _budgeted(call)
    original = call.fallback_for or {"service": call.service, "tool": call.tool}
    result = StepResult(service=original["service"], tool=original["tool"], worker=worker, started_at=call.started_at)
    # The step is marked running in the same round trip that reads its inputs; a step the gate then stops
    # overwrites the mark with why.
    mark = (call.step_id, result.model_copy(update={"status": "running"})) if call.attempt == 0 else None
    # The breaker is asked in that round trip too, when the service has one instance to ask about.
    pipe = store.redis.pipeline(transaction=False)
    ask = runtime.balancer.ask_ahead(call.service, pipe)
    status, params, records, asked = store.inputs(call.run_id, {*call.depends_on, *call.reads}, mark, pipe)
    if ask is not None:
        ask.answer(asked[0])
    try:
        return _run(runtime, call, result, status, params, records, ask)
    finally:
        if ask is not None:
            runtime.balancer.give_back(ask)


def _run(runtime: Runtime, call: StepCall, result: StepResult, status: str, params: dict[str, Any],
         records: dict[str, StepResult], ask: Ask | None) -> Outcome:  # fmt: skip
    """Gate the step on its inputs, then make its attempts and record the result."""
    store = runtime.store
    if call.opens:
        params, records = open_params(params), {sid: open_result(r) for sid, r in records.items()}
    context = {
        "params": params,
        "steps": {sid: r.model_dump(include={"output", "status"}) for sid, r in records.items()},
    }
    verdict = _gate(call, status, records, context)
    if verdict is not None:
        result.status, result.skip_reason, result.error = verdict
        store.save_step(call.run_id, call.step_id, result)
        return result
    lease = None
    try:
        outcome, lease = _attempt(runtime, call, context, result, ask)
    except Exception as exc:  # boundary: a step records any failure instead of breaking the canvas
        result.status, result.error, result.error_type = "failed", f"{type(exc).__name__}: {exc}", type(exc).__name__
        outcome = _finished(result, call, False)
    if isinstance(outcome, StepResult):
        if call.sensitive:
            outcome = seal_result(outcome)
        # A successful call's breaker record and in-flight release share the result's round trip.
        pipe = store.redis.pipeline(transaction=False)
        if lease is not None:
            runtime.balancer.release(lease, False, pipe)
        store.save_step(call.run_id, call.step_id, outcome, pipe)
        scripts.execute(pipe)
    return outcome


def _failed(runtime: Runtime, call: StepCall, worker: str | None, error: str, error_type: str) -> StepResult:
    """Record the step as failed, with why. A message for no known run is dropped with the error instead
    (recording it would create a run's keys)."""
    runtime.store.status(call.run_id)  # raises RunNotFound
    now = time.time()
    started = call.started_at or now
    result = StepResult(service=call.service, tool=call.tool, worker=worker, status="failed", error=error,
                        error_type=error_type, started_at=started, finished_at=now,
                        duration_ms=round((now - started) * 1000, 3))  # fmt: skip
    runtime.store.save_step(call.run_id, call.step_id, seal_result(result) if call.sensitive else result)
    return result


def _budgeted(call: StepCall) -> StepCall:
    """The call with its start and the end of its time budget set (a fallback call gets a budget of its own)."""
    if call.started_at == 0.0:
        now = time.time()
        return replace(call, started_at=now, deadline=now + call.timeout)
    if call.deadline == 0.0:
        return replace(call, deadline=time.time() + call.timeout)
    return call


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


def _attempt(
    runtime: Runtime, call: StepCall, context: dict[str, Any], result: StepResult, ask: Ask | None
) -> tuple[Outcome, Lease | None]:
    """Make attempts until one succeeds (its lease still held), a backoff is due, or the failure is final."""
    arguments: dict[str, Any] = {}
    while True:
        result.instance = None
        try:
            arguments = render(sealer().open(call.arguments) if call.sensitive else call.arguments, context)
            result.arguments_digest = sealer().digest(arguments) if call.sensitive else digest(arguments)
            result.output, lease = _call_once(runtime, call, arguments, result, ask)
        except OrchestratorError as exc:
            call = _failed_attempt(call, result.instance or "", exc)
            next_step = _after_failure(call, exc)
            if next_step == "again":
                continue
            if isinstance(next_step, float):
                return Retry(call, next_step), None
            return _give_up(runtime, call, arguments, result, exc), None
        result.status = "succeeded"
        if call.fallback_for:
            result.served_by = f"{call.service}.{call.tool}"
        elif call.use_stale:
            _remember(runtime, call, arguments, result.output)
        return _finished(result, call, True), lease


def _call_once(
    runtime: Runtime, call: StepCall, arguments: dict[str, Any], result: StepResult, ask: Ask | None
) -> tuple[Any, Lease]:
    """One attempt on one instance: after a failure, the next attempt goes to another instance if any.
    A failed attempt releases its lease here; a successful one hands it back, released with the result."""
    failed_on = {e["instance"] for e in call.attempt_errors if e["service"] == call.service}
    lease = runtime.balancer.lease(call.service, call.deadline, elsewhere=failed_on, ask=ask)
    result.instance = lease.instance
    budget = max(0.001, call.deadline - time.time())
    try:
        call_tool = runtime.pool.call_tool(lease.instance, call.tool, arguments, budget)
        return runtime.pool.run(call_tool, key=call.run_id), lease
    except ToolError:
        runtime.balancer.release(lease, False)  # the server answered: a tool's own error says nothing of its health
        raise
    except Cancelled:
        runtime.balancer.release(lease, None)  # the run was cancelled: says nothing of the server
        raise
    except TransportError:
        runtime.balancer.release(lease, True)
        runtime.balancer.avoid(call.service, lease.instance)
        raise
    except BaseException:
        runtime.balancer.release(lease, True)
        raise


def _failed_attempt(call: StepCall, instance: str, exc: OrchestratorError) -> StepCall:
    # A sensitive call's errors may quote its arguments, and its next attempt's message carries them: sealed.
    message = sealer().seal(str(exc)) if call.sensitive else str(exc)
    error = AttemptError(attempt=call.attempt + 1, service=call.service, instance=instance, type=type(exc).__name__,
                         message=message, at=time.time())  # fmt: skip
    return replace(call, attempt=call.attempt + 1, attempt_errors=[*call.attempt_errors, error.model_dump()])


def _after_failure(call: StepCall, exc: OrchestratorError) -> str | float | None:
    """ "again" for an immediate retry, a countdown for a backoff, None when the failure is final."""
    retryable = isinstance(exc, TransportError) or (call.retry_tool_errors and isinstance(exc, ToolError))
    remaining = call.deadline - time.time()
    if not retryable or call.attempt > call.retries or remaining <= 0:
        return None
    first_network_fault = call.attempt == 1 and isinstance(exc, TransportError) and "timeout" not in str(exc).lower()
    if first_network_fault:
        return "again"
    state = RetryCallState(Retrying(), None, (), {})
    state.attempt_number = call.attempt
    countdown = BACKOFF(state)
    return countdown if countdown < remaining else None


def _give_up(runtime: Runtime, call: StepCall, arguments: dict[str, Any], result: StepResult,
             exc: OrchestratorError) -> Outcome:  # fmt: skip
    """The call failed for good: fallback service, stale answer, degradation, or failure."""
    result.error, result.error_type = str(exc), type(exc).__name__
    if isinstance(exc, Cancelled):
        result.status = "cancelled"
    elif call.fallback and not call.fallback_for:
        return Reroute(_fallback_call(call))
    elif call.use_stale and isinstance(exc, TransportError | Unavailable):
        original = call.fallback_for or {"service": call.service, "tool": call.tool, "arguments": arguments}
        stale = _recall(runtime, original, call.use_stale, call.sensitive)
        if stale is not None:
            result.status, result.output, result.stale_age_s = "stale-cache", stale[0], round(stale[1], 3)
    if result.status == "pending":
        result.status = "degraded" if call.optional else "failed"
    return _finished(result, call, False)


def _fallback_call(call: StepCall) -> StepCall:
    fallback = call.fallback or {}
    return replace(
        call,
        service=fallback["service"],
        tool=fallback["tool"],
        arguments=fallback["arguments"],
        timeout=fallback["timeout"],
        retries=fallback["retries"],
        attempt=0,
        deadline=0.0,
        fallback_for={"service": call.service, "tool": call.tool, "arguments": call.arguments},
    )


def _finished(result: StepResult, call: StepCall, succeeded: bool) -> StepResult:
    result.attempts = len(call.attempt_errors) + int(succeeded)
    result.attempt_errors = [AttemptError.model_validate(e) for e in call.attempt_errors]
    result.finished_at = time.time()
    result.started_at = call.started_at or result.finished_at
    result.duration_ms = round((result.finished_at - result.started_at) * 1000, 3)
    return result


def _cache_key(runtime: Runtime, service: str, tool: str, arguments: Any, sensitive: bool = False) -> str:
    if sensitive:  # a keyed digest: a plain hash of sensitive arguments could be searched for guessed values
        digest = sealer().digest(sealer().open(arguments))
    else:
        digest = hashlib.sha256(json.dumps(arguments, sort_keys=True, default=str).encode()).hexdigest()
    return f"{runtime.store.namespace}:cache:{service}:{tool}:{digest}"


def _remember(runtime: Runtime, call: StepCall, arguments: dict[str, Any], output: Any) -> None:
    key = _cache_key(runtime, call.service, call.tool, arguments, call.sensitive)
    value = json.dumps({"output": sealer().seal(output) if call.sensitive else output, "at": time.time()})
    runtime.store.redis.set(key, value, ex=int(call.use_stale or 0) or None)


def _recall(runtime: Runtime, original: dict[str, Any], max_age: float | None,
            sensitive: bool = False) -> tuple[Any, float] | None:  # fmt: skip
    key = _cache_key(runtime, original["service"], original["tool"], original["arguments"], sensitive)
    raw = runtime.store.redis.get(key)
    if raw is None:
        return None
    entry = json.loads(raw)
    age = time.time() - float(entry["at"])
    return (entry["output"], age) if max_age is None or age <= max_age else None


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
