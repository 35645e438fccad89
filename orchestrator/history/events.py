"""Record events: what the run store pushes onto the records buffer in Redis for the flusher to write to SQL.

An event is one JSON object with a `kind` (run, step, finish, cancel, operation), a unique `id` (so a batch
written twice after a crash is not audited twice) and `at`. Events ride in the pipelines the run store
already sends, so recording costs a step no extra round trip; the flusher drains them into SQL in batches.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from redis import Redis

from orchestrator.settings import settings

# A parameter whose name looks like one of these holds a secret: its value never reaches the records.
SECRET_KEY = re.compile(r"password|passwd|token|secret|key|authorization", re.IGNORECASE)
REDACTED = "[redacted]"


def buffer_key(namespace: str) -> str:
    """The Redis list the events wait in until they are written to SQL."""
    return f"{namespace}:records"


def caller() -> str:
    """Who this process acts for when no caller is given: its operating-system user."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        return "unknown"


def redact(value: Any) -> Any:
    """A copy of value with the values of secret-looking keys replaced, at any depth."""
    if isinstance(value, dict):
        return {k: REDACTED if SECRET_KEY.search(str(k)) else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(item) for item in value]
    return value


def digest(arguments: Any) -> str:
    """sha256 of the canonical JSON of a tool call's arguments: proves what was sent without keeping it."""
    return hashlib.sha256(canonical(arguments).encode()).hexdigest()


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def event(kind: str, **fields: Any) -> str:
    return json.dumps({"kind": kind, "id": uuid.uuid4().hex, "at": time.time(), **fields}, default=str)


_AT = re.compile(rb'"at": ([0-9.e+-]+)')


def recorded_at(raw: bytes | str) -> float:
    """When an event was made. `at` comes third in every event (see `event` and `step_event`), so it is read off
    the event's head without parsing, say, a whole run's plan; 0.0 (long ago) for an event it cannot be read from."""
    raw = raw.encode() if isinstance(raw, str) else raw
    found = _AT.search(raw, 0, 160)
    try:
        return float(found.group(1) if found else json.loads(raw)["at"])
    except (ValueError, KeyError, TypeError):
        return 0.0


def step_event(run_id: str, step_id: str, result_json: str) -> str:
    """A step's record; the StepResult's JSON is spliced in as it is, not parsed and dumped again."""
    head = json.dumps({"kind": "step", "id": uuid.uuid4().hex, "at": time.time(), "run_id": run_id,
                       "step_id": step_id})  # fmt: skip
    return f'{head[:-1]}, "result": {result_json}}}'


def run_event(run_id: str, fields: dict[str, Any], created_at: float) -> str:
    plan = json.loads(fields["plan"])
    return event(
        "run",
        run_id=run_id,
        workflow=fields["workflow"],
        version=fields["version"],
        params=redact(json.loads(fields["params"])),
        who=fields.get("who") or caller(),
        steps=[{"id": s["id"], "service": s["service"], "tool": s["tool"]} for s in plan["steps"]],
        created_at=created_at,
        definition=json.loads(fields["definition"]) if "definition" in fields else None,
        resumed_from=fields.get("resumed_from"),
        idempotency_key=fields.get("idempotency_key"),
    )


def record_operation(redis: Redis, namespace: str, action: str, who: str | None = None, **what: Any) -> None:
    """Audit an operation (register, deregister, credential change, …): one row in the audit chain.

    `what` holds service, instance, tool, outcome or detail (anything else goes into detail); never pass
    secrets, only their digests.
    """
    redis.rpush(buffer_key(namespace), operation_event(action, who, **what))


def operation_event(action: str, who: str | None = None, **what: Any) -> str:
    return event("operation", action=action, who=who or caller(), **what)


def audit_security(redis: Redis, namespace: str) -> Callable[[str, str, dict[str, Any]], None]:
    """A security-event listener that puts each event in the audit chain (when records are on)."""

    def record(kind: str, subject: str, detail: dict[str, Any]) -> None:
        if settings.records:
            record_operation(redis, namespace, kind, subject, detail=detail)

    return record
