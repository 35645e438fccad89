"""Quarantine: a task message the worker cannot decode, validate or start goes to the dead letters, not round again.

Celery rejects some bad messages itself (and then loses them) and crashes on others before any task code runs:
a body whose args are a dict, a `timelimit` header of `"abc"`, a JSON list for a body. A crash leaves the message
unacknowledged, so it comes back at every restart: one bad message takes the fleet down. The consumer here checks
each task message before Celery builds its request (decoded once, as the request would decode it: see
workers/request.py), and whatever it refuses, or whatever still raises before the task body, is stored in the
namespace's dead letters (orchestrator/deadletters.py) with the reason, reported as a `message-refused` security
event, and acknowledged. A check costs a few microseconds a message (README, "Failure modes").
"""

from __future__ import annotations

import logging
import numbers
import time
from collections.abc import Callable
from typing import Any

from celery.utils.time import maybe_iso8601
from celery.worker.consumer import Consumer
from redis import Redis

from orchestrator.deadletters import DeadLetter, DeadLetters
from orchestrator.messages import StepCall
from orchestrator.results import StepError, StepResult
from orchestrator.security.events import security_event
from orchestrator.settings import settings

log = logging.getLogger(__name__)

_redis: Redis | None = None


def refusal(message: Any, tasks: Any) -> str | None:
    """Why this task message cannot run (None when it can): protocol 2 headers, a known task, a decodable body of
    (args list, kwargs dict, embed dict) whose arguments fit the task's signature."""
    headers = message.headers
    if not isinstance(headers, dict) or "task" not in headers:
        return "not a task message: no `task` header (protocol 2)"
    name = headers["task"]
    if not isinstance(name, str) or name not in tasks:
        return f"unknown task {name!r}"
    problem = _header_problem(headers)
    if problem:
        return problem
    try:
        body = message.payload  # decoded once, cached on the message for the request
    except Exception as exc:  # boundary: any decoding failure (bad JSON, bad signature, refused content) is the verdict
        return f"cannot decode the body: {type(exc).__name__}: {exc}"
    if not isinstance(body, list | tuple) or len(body) != 3:
        return f"the body is not [args, kwargs, embed]: {type(body).__name__}"
    args, kwargs, embed = body
    if not isinstance(args, list | tuple) or not isinstance(kwargs, dict) or not isinstance(embed, dict | None):
        return f"bad body: args {type(args).__name__}, kwargs {type(kwargs).__name__}, embed {type(embed).__name__}"
    if not all(isinstance(key, str) for key in kwargs):
        return "bad body: kwargs with a key that is not a string"
    try:
        tasks[name].__header__(*args, **kwargs)  # the task's signature, without its body (Celery's own check)
    except TypeError as exc:
        return f"arguments do not fit task {name}: {exc}"
    return _batch_problem(kwargs["calls"]) if name == "mcpo.batch" else None


def _batch_problem(calls: Any) -> str | None:
    """Why a batch message's calls cannot run: each must be a step call's kwargs (orchestrator/messages.py)."""
    if not isinstance(calls, list) or not calls:
        return f"bad batch: `calls` is not a list of calls: {type(calls).__name__}"
    for index, call in enumerate(calls):
        if not isinstance(call, dict) or not all(isinstance(key, str) for key in call):
            return f"bad batch: call {index} is not an object with string keys"
        try:
            StepCall(**call)
        except TypeError as exc:
            return f"bad batch: call {index} does not fit a step call: {exc}"
    return None


def _header_problem(headers: dict[str, Any]) -> str | None:
    if not isinstance(headers.get("id"), str):
        return "bad header `id`: not a string"
    limits = headers.get("timelimit")
    if limits is not None and not (
        isinstance(limits, list | tuple) and len(limits) == 2 and all(_seconds(limit) for limit in limits)
    ):
        return f"bad header `timelimit`: {limits!r}"
    for name in ("eta", "expires"):
        value = headers.get(name)
        if value is None or (name == "expires" and _seconds(value)):
            continue
        try:
            maybe_iso8601(value)
        except (TypeError, ValueError) as exc:
            return f"bad header `{name}`: {value!r} ({exc})"
    retries = headers.get("retries")
    if retries is not None and (not isinstance(retries, int) or isinstance(retries, bool)):
        return f"bad header `retries`: {retries!r}"
    return None


def _seconds(value: Any) -> bool:
    return value is None or (isinstance(value, numbers.Real) and not isinstance(value, bool))


def quarantine(message: Any, reason: str) -> None:
    """Move message to the dead letters with reason, report it, and acknowledge it. Should the dead letters be out
    of reach the message is left unacknowledged (redelivered after the visibility timeout), never dropped."""
    queue = str((getattr(message, "delivery_info", None) or {}).get("routing_key", ""))
    letter = DeadLetter("message", reason, queue, _raw(message), envelope=_envelope(message))
    try:
        DeadLetters(_connection(), settings.namespace).add(letter)
    except Exception:  # boundary: Redis is gone; the message stays with the broker
        log.exception("quarantine: cannot store the refused message from %s (%s); left unacknowledged", queue, reason)
        return
    log.error("quarantine: message from %s refused (%s); dead letter %s", queue, reason, letter.id)
    security_event("message-refused", "anonymous", {"reason": reason, "queue": queue, "dead_letter": letter.id})
    _end_run(message, f"its message was quarantined: {reason} (dead letter {letter.id})")
    if not message.acknowledged:
        message.ack()


def _end_run(message: Any, error: str) -> None:
    """Fail the run a refused step or finish message belonged to, when the message still says which: its chain
    would never go on, and the run would stay `running` for ever. The dead letter can be requeued, or the run
    resumed (`mcp-orchestrator resume`)."""
    from workers import runtime

    current = runtime._current
    task = message.headers.get("task")
    try:
        kwargs = message.payload[1]
        named = kwargs["calls"] if task == "mcpo.batch" else [kwargs]
        run_id = str(named[0]["run_id"])
        steps = [(str(call.get("step_id", "")), str(call.get("service", "")), str(call.get("tool", "")))
                 for call in named if isinstance(call, dict)]  # fmt: skip
    except Exception:  # boundary: a body too broken to name its run names none
        return
    if current is None or task not in ("mcpo.call", "mcpo.batch", "mcpo.finish"):
        return
    store = current.store
    try:
        store.status(run_id)  # a message for no known run creates no run keys
        failures = [StepError(step=step, service=service, tool=tool, type="MessageRefused", message=error)
                    for step, service, tool in steps]  # fmt: skip
        now = time.time()
        for failure in failures:
            if failure.step:
                store.save_step(run_id, failure.step, StepResult(service=failure.service, tool=failure.tool,
                                                                 status="failed", error=error, error_type=failure.type,
                                                                 started_at=now, finished_at=now))  # fmt: skip
        store.finish(run_id, "failed", None, failures[:1], {failures[0].service: {failures[0].type: len(failures)}})
    except Exception:  # boundary: the dead letter is kept; the run is left as it is
        log.exception("quarantine: cannot fail run %s after refusing its message", run_id)


def _raw(message: Any) -> bytes:
    body = message.body
    return body if isinstance(body, bytes) else str(body).encode("utf-8", "replace")


def _envelope(message: Any) -> dict[str, Any]:
    delivery = getattr(message, "delivery_info", None) or {}
    return {"content_type": message.content_type, "content_encoding": message.content_encoding,
            "headers": message.headers if isinstance(message.headers, dict) else {},
            "properties": message.properties if isinstance(message.properties, dict) else {},
            "exchange": delivery.get("exchange") or ""}  # fmt: skip


def _connection() -> Redis:
    """The runtime's Redis when this worker has one, else one of its own to the result backend."""
    global _redis
    from workers import runtime

    if runtime._current is not None:
        return runtime._current.store.redis
    if _redis is None:
        from workers.app import redis_url
        from workers.tls import connect_redis

        _redis = connect_redis(redis_url())
    return _redis


class QuarantineConsumer(Consumer):  # type: ignore[misc]
    """The worker's consumer: every task message is checked before Celery builds its request, and any message it
    refuses, or that still raises before the task body, is quarantined rather than crashing the worker."""

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Any], None]:
        handle = super().create_task_handler(*args, **kwargs)
        tasks = self.app.tasks

        def on_task_received(message: Any) -> None:
            try:
                reason = refusal(message, tasks)
            except Exception as exc:  # boundary: a message odd enough to break the check is refused too
                reason = f"unreadable message: {type(exc).__name__}: {exc}"
            if reason is not None:
                return quarantine(message, reason)
            try:
                handle(message)
            except Exception as exc:  # boundary: Celery raised before the task body: refuse, don't crash the worker
                quarantine(message, f"{type(exc).__name__}: {exc}")

        return on_task_received

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        quarantine(message, f"cannot decode: {type(exc).__name__}: {exc}")

    def on_unknown_message(self, body: Any, message: Any) -> None:
        quarantine(message, "not a task message")

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        quarantine(message, f"unknown task: {exc}")

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        quarantine(message, f"invalid task: {type(exc).__name__}: {exc}")
