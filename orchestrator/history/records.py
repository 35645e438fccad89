"""The SQL records store: every run, every step and the audit chain, kept after Redis forgets a run.

Tables (orchestrator/history/tables.py; migrations in orchestrator/history/migrations): `runs`, `steps`,
`outputs` (a step output over OUTPUT_CAP bytes of JSON, referenced by `steps.output_id`), `audit` and
`audit_head` (see orchestrator/history/audit.py). SQLite under MCPO_HOME by default, creating its own schema;
PostgreSQL (or any URL) via DATABASE_URL, migrated with `mcp-orchestrator db upgrade`.

Nothing here runs on a step's path: `apply` writes a batch of record events (orchestrator/history/events.py) that
the flusher (orchestrator/history/flusher.py) took from the Redis buffer, in one transaction.
"""

from __future__ import annotations

import fcntl
import json
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, and_, create_engine, inspect, or_, select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from orchestrator.errors import RecordsError, RunNotFound
from orchestrator.health import Health
from orchestrator.history import audit, migrations
from orchestrator.history.events import canonical
from orchestrator.history.tables import HealthRecord, OutputRecord, RunRecord, StepRecord
from orchestrator.results import TERMINAL_RUN, TERMINAL_STEP, RunResult, StepError, StepResult

log = logging.getLogger(__name__)

OUTPUT_CAP = 64 * 1024  # bytes of JSON a `steps.output` holds; a larger output goes to `outputs`


def database_url(url: str) -> str:
    """The SQLAlchemy URL for a DATABASE_URL: plain postgresql:// means psycopg 3."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url.removeprefix(prefix)
    return url


def describe(url: str) -> str:
    """The URL without its password, for messages."""
    return make_url(url).render_as_string(hide_password=True)


class RecordStore:
    """Writes record events to the SQL records and reads runs back from them."""

    def __init__(self, url: str) -> None:
        self.url = database_url(url)
        self._engine: Engine | None = None

    @property
    def engine(self) -> Engine:
        """The engine, creating a SQLite database's schema on first use (the embedded default)."""
        if self._engine is None:
            engine = _engine(self.url)
            if engine.dialect.name == "sqlite":
                _upgrade(engine, self.url)
            self._engine = engine
        return self._engine

    def upgrade(self) -> None:
        """Migrate the database to the newest schema (Alembic, orchestrator/history/migrations)."""
        try:
            _upgrade(self.engine, self.url)
        except SQLAlchemyError as exc:
            raise RecordsError(_explain(exc, self.url)) from exc

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction, committed at the end; database failures raise RecordsError."""
        try:
            with Session(self.engine, expire_on_commit=False) as session, session.begin():
                yield session
        except SQLAlchemyError as exc:
            raise RecordsError(_explain(exc, self.url)) from exc

    def apply(self, raw_events: Iterable[bytes | str]) -> None:
        """Write a batch of record events in one transaction (serialized with every other writer)."""
        events = [json.loads(raw) for raw in raw_events]
        with self.session() as session:
            head = audit.lock_head(session)
            batch = _Batch(session, events)
            for event in events:
                if event.get("id") not in batch.seen:
                    _handle(batch, event)
            audit.append(session, head, batch.audit)

    def load(self, run_id: str) -> RunResult:
        """A run as the records hold it; `params` as recorded, with secrets redacted."""
        with self.session() as session:
            run = session.get(RunRecord, run_id)
            if run is None:
                raise RunNotFound(
                    f"run {run_id} is not known (not in Redis, nor in the records at {describe(self.url)})"
                )
            steps = session.scalars(select(StepRecord).where(StepRecord.run_id == run_id)).all()
            ordered = sorted(steps, key=lambda s: (s.position is None, s.position or 0, s.step_id))
            return RunResult(
                id=run.id, workflow=run.workflow, status=run.status,  # type: ignore[arg-type]
                steps={s.step_id: _step_result(session, s) for s in ordered}, output=run.output,
                errors=[StepError.model_validate(e) for e in run.errors or []], error_summary=run.error_summary or {},
                params=run.params or {}, fallback_run=run.fallback_run, resumed_from=run.resumed_from,
                idempotency_key=run.idempotency_key, created_at=run.created_at, finished_at=run.finished_at,
            )  # fmt: skip

    def definition(self, run_id: str) -> dict[str, Any] | None:
        """The workflow definition a run was started from (None for a run recorded before it was kept)."""
        with self.session() as session:
            run = session.get(RunRecord, run_id)
            if run is None:
                raise RunNotFound(
                    f"run {run_id} is not known (not in Redis, nor in the records at {describe(self.url)})"
                )
            return dict(run.definition) if run.definition else None

    def runs(self, workflow: str | None = None, status: str | None = None, since: float | None = None,
             limit: int = 50) -> list[dict[str, Any]]:  # fmt: skip
        """Recent runs, newest first, with the given workflow, status and creation time at or after `since`."""
        query = select(RunRecord).order_by(RunRecord.created_at.desc()).limit(limit)
        if workflow:
            query = query.where(RunRecord.workflow == workflow)
        if status:
            query = query.where(RunRecord.status == status)
        if since is not None:
            query = query.where(RunRecord.created_at >= since)
        with self.session() as session:
            return [_summary(run) for run in session.scalars(query)]

    def health(self, service: str, instance: str, since: float | None = None, limit: int = 1000) -> list[Health]:
        """The health beats of one instance, newest first."""
        query = select(HealthRecord).where(HealthRecord.service == service, HealthRecord.instance == instance)
        if since is not None:
            query = query.where(HealthRecord.at >= since)
        query = query.order_by(HealthRecord.at.desc()).limit(limit)
        with self.session() as session:
            return [_health(row) for row in session.scalars(query)]

    def has_schema(self) -> bool:
        with self.engine.connect() as connection:
            return bool(inspect(connection).has_table("audit_head"))

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


def _engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        # A writer waits this long for another process's transaction before giving up (and retrying later).
        return create_engine(parsed, connect_args={"timeout": 30})
    if parsed.get_backend_name() == "postgresql":
        # A database that is down must fail a flush quickly, not hang it: the events wait in Redis.
        return create_engine(parsed, pool_pre_ping=True, connect_args={"connect_timeout": 5})
    return create_engine(parsed, pool_pre_ping=True)


def _upgrade(engine: Engine, url: str) -> None:
    with _file_lock(url), engine.begin() as connection:
        migrations.upgrade(connection)


@contextmanager
def _file_lock(url: str) -> Iterator[None]:
    """For SQLite: one process at a time migrates the file (workers starting together would race)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        yield
        return
    with open(f"{parsed.database}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _explain(exc: SQLAlchemyError, url: str) -> str:
    text = str(exc).splitlines()[0]
    if "audit_head" in text and ("no such table" in text or "does not exist" in text):
        return f"the records database {describe(url)} has no schema yet: run `mcp-orchestrator db upgrade`"
    return f"records database {describe(url)}: {text}"


@dataclass
class _Batch:
    """What one `apply` works on: the rows its events touch, loaded once, and the audit rows it adds."""

    session: Session
    events: list[dict[str, Any]]
    runs: dict[str, RunRecord] = field(default_factory=dict)
    steps: dict[tuple[str, str], StepRecord] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)
    audit: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        run_ids = {e["run_id"] for e in self.events if e.get("run_id")}
        if run_ids:
            self.runs = {r.id: r for r in self.session.scalars(select(RunRecord).where(RunRecord.id.in_(run_ids)))}
            found = self.session.scalars(select(StepRecord).where(_touched(run_ids, self.events)))
            self.steps = {(s.run_id, s.step_id): s for s in found}
        # A batch written before a crash, and read again, must not be audited twice.
        self.seen = audit.seen(self.session, [e["id"] for e in self.events])

    def who(self, run_id: str) -> str | None:
        run = self.runs.get(run_id)
        return run.who if run is not None else None


def _touched(run_ids: set[str], events: list[dict[str, Any]]) -> ColumnElement[bool]:
    """The step rows a batch's events may touch: every step of a run it enqueues, else the steps it records
    (by id, within the batch's runs). Loading only these keeps a batch's cost to its own size, not to the
    size of the runs it touches."""
    whole = {e["run_id"] for e in events if e.get("kind") == "run"}
    step_ids = {e["step_id"] for e in events if e.get("step_id")}
    return and_(StepRecord.run_id.in_(run_ids), or_(StepRecord.run_id.in_(whole), StepRecord.step_id.in_(step_ids)))


def _on_run(batch: _Batch, event: dict[str, Any]) -> None:
    run_id = event["run_id"]
    run = batch.runs.get(run_id)
    if run is None:
        run = RunRecord(id=run_id, status="pending")
        batch.session.add(run)
        batch.runs[run_id] = run
    run.workflow, run.version, run.params, run.who = event["workflow"], event["version"], event["params"], event["who"]
    run.created_at = event["created_at"]
    run.definition, run.resumed_from = event.get("definition"), event.get("resumed_from")
    run.idempotency_key = event.get("idempotency_key")
    for position, step in enumerate(event["steps"]):
        key = (run_id, step["id"])
        if key not in batch.steps:
            record = StepRecord(run_id=run_id, step_id=step["id"], position=position, status="pending",
                                service=step["service"], tool=step["tool"], attempts=0)  # fmt: skip
            batch.session.add(record)
            batch.steps[key] = record
        else:
            batch.steps[key].position = position
    detail = {"workflow": event["workflow"], "version": event["version"], "steps": len(event["steps"])}
    detail.update({k: event[k] for k in ("resumed_from", "idempotency_key") if event.get(k)})
    batch.audit.append(_row(event, 0, action="enqueue", who=event["who"], run_id=run_id, outcome="accepted",
                            detail=detail))  # fmt: skip


def _on_step(batch: _Batch, event: dict[str, Any]) -> None:
    run_id, step_id, result = event["run_id"], event["step_id"], StepResult.model_validate(event["result"])
    record = batch.steps.get((run_id, step_id))
    if record is None:
        record = StepRecord(run_id=run_id, step_id=step_id, attempts=0)
        batch.session.add(record)
        batch.steps[(run_id, step_id)] = record
    _fill_step(batch.session, record, result)
    run = batch.runs.get(run_id)
    if run is not None and run.started_at is None and result.status != "pending":
        run.started_at = result.started_at or event["at"]
        if run.status == "pending":
            run.status = "running"
    # A reused step made no call in this run: the run it came from audited that call. A cached answer made none
    # either, but answered the step from an earlier call: its row says `cached`, with the answer's age.
    called = result.attempts or result.attempt_errors or result.instance or result.status == "cached"
    if result.status in TERMINAL_STEP and called and not result.reused_from:
        batch.audit.extend(_interactions(event, result, batch.who(run_id)))


def _fill_step(session: Session, record: StepRecord, result: StepResult) -> None:
    record.status, record.service, record.tool = result.status, result.service, result.tool
    record.instance, record.attempts, record.duration_ms = result.instance, result.attempts, result.duration_ms
    record.started_at, record.finished_at, record.worker = result.started_at, result.finished_at, result.worker
    record.error, record.error_type, record.served_by = result.error, result.error_type, result.served_by
    record.skip_reason, record.stale_age_s = result.skip_reason, result.stale_age_s
    record.attempt_errors = [e.model_dump() for e in result.attempt_errors]
    record.arguments_digest, record.reused_from = result.arguments_digest, result.reused_from
    body = canonical(result.output)
    record.output_size = len(body.encode())
    if record.output_size <= OUTPUT_CAP:
        record.output, record.output_id = result.output, None
        return
    whole = OutputRecord(run_id=record.run_id, step_id=record.step_id, body=body)
    session.add(whole)
    session.flush()
    record.output, record.output_id = None, whole.id


def _interactions(event: dict[str, Any], result: StepResult, who: str | None) -> list[dict[str, Any]]:
    """The audit rows of a step's MCP interactions: each failed attempt, then the call's outcome."""
    common = {"who": who, "run_id": event["run_id"], "step_id": event["step_id"], "tool": result.tool,
              "worker": result.worker, "arguments_digest": event["result"].get("arguments_digest")}  # fmt: skip
    rows = [
        _row(event, n, action="attempt", at=failure.at, service=failure.service, instance=failure.instance,
             outcome=f"error:{failure.type}", detail={"attempt": failure.attempt, "message": failure.message},
             **common)
        for n, failure in enumerate(result.attempt_errors)
    ]  # fmt: skip
    detail = {"attempts": result.attempts, "served_by": result.served_by, "error": result.error,
              "age_s": result.stale_age_s}  # fmt: skip
    rows.append(_row(event, len(rows), action="call", at=result.finished_at or event["at"], service=result.service,
                     instance=result.instance, outcome=result.status, duration_ms=result.duration_ms,
                     detail={k: v for k, v in detail.items() if v}, **common))  # fmt: skip
    return rows


def _on_finish(batch: _Batch, event: dict[str, Any]) -> None:
    run = batch.runs.get(event["run_id"])
    if run is None:
        log.warning("records: finish of run=%s that the records do not hold; skipped", event["run_id"])
        return
    run.output, run.errors, run.error_summary = event["output"], event["errors"], event["error_summary"]
    if run.status not in TERMINAL_RUN:  # as in Redis: the first end wins (a cancel over a late finish)
        run.status, run.finished_at = event["status"], event.get("finished_at", event["at"])


def _on_cancel(batch: _Batch, event: dict[str, Any]) -> None:
    run = batch.runs.get(event["run_id"])
    if run is None:
        outcome = "unknown run"
    elif run.status in TERMINAL_RUN:
        outcome = f"already {run.status}"
    else:
        run.status, run.finished_at, outcome = "cancelled", event.get("finished_at", event["at"]), "cancelled"
    batch.audit.append(_row(event, 0, action="cancel", who=event["who"], run_id=event["run_id"], outcome=outcome))


def _on_fallback(batch: _Batch, event: dict[str, Any]) -> None:
    run = batch.runs.get(event["run_id"])
    if run is not None:
        run.fallback_run = event["fallback_run"]


def _on_operation(batch: _Batch, event: dict[str, Any]) -> None:
    columns = {"who", "run_id", "step_id", "service", "instance", "tool", "arguments_digest", "outcome",
               "duration_ms", "worker"}  # fmt: skip
    known = {k: v for k, v in event.items() if k in columns}
    extra = {k: v for k, v in event.items() if k not in columns | {"kind", "id", "at", "action", "detail"}}
    detail = {**(event.get("detail") or {}), **extra} or None
    batch.audit.append(_row(event, 0, action=event["action"], detail=detail, **known))


def _handle(batch: _Batch, event: dict[str, Any]) -> None:
    handler = _HANDLERS.get(event.get("kind", ""))
    try:
        if handler is None:
            raise ValueError(f"unknown kind {event.get('kind')!r}")
        handler(batch, event)
    except (KeyError, TypeError, ValueError) as exc:  # one malformed event must not hold up every later one
        log.error("records: event %s (run=%s step=%s) skipped: %s", event.get("id"), event.get("run_id"),
                  event.get("step_id"), exc)  # fmt: skip


def _health(row: HealthRecord) -> Health:
    return Health(status=row.status, at=row.at, latency_ms=row.latency_ms, tools=row.tools, error=row.error)  # type: ignore[arg-type]


def _on_health(batch: _Batch, event: dict[str, Any]) -> None:
    beat = {k: event.get(k) for k in ("service", "instance", "status", "latency_ms", "tools", "error")}
    batch.session.merge(HealthRecord(event_id=event["id"], at=event["beat_at"], **beat))


_HANDLERS = {"run": _on_run, "step": _on_step, "finish": _on_finish, "cancel": _on_cancel,
             "fallback": _on_fallback, "operation": _on_operation, "health": _on_health}  # fmt: skip


def _row(event: dict[str, Any], n: int, **fields: Any) -> dict[str, Any]:
    """An audit row of an event; its event_id (event id and index) makes a replayed batch recognizable."""
    return {"event_id": f"{event['id']}:{n}", "at": fields.pop("at", None) or event["at"], **fields}


def _step_result(session: Session, step: StepRecord) -> StepResult:
    output = step.output
    if step.output_id is not None:
        whole = session.get(OutputRecord, step.output_id)
        output = json.loads(whole.body) if whole is not None else None
    return StepResult(
        status=step.status, service=step.service, tool=step.tool, output=output,  # type: ignore[arg-type]
        error=step.error, error_type=step.error_type, attempts=step.attempts,
        attempt_errors=step.attempt_errors or [], instance=step.instance, served_by=step.served_by,
        skip_reason=step.skip_reason, stale_age_s=step.stale_age_s,  # type: ignore[arg-type]
        duration_ms=step.duration_ms, started_at=step.started_at, finished_at=step.finished_at, worker=step.worker,
        arguments_digest=step.arguments_digest, reused_from=step.reused_from,
    )  # fmt: skip


def _summary(run: RunRecord) -> dict[str, Any]:
    return {"id": run.id, "workflow": run.workflow, "status": run.status, "who": run.who,
            "created_at": run.created_at, "finished_at": run.finished_at}  # fmt: skip
