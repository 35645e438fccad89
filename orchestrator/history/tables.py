"""The SQL tables of the records (SQLAlchemy 2 typed ORM); orchestrator/history/migrations creates them.

Times are epoch seconds (floats), as in RunResult; JSON columns hold what RunResult and StepResult hold.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Float, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# An integer primary key SQLite numbers itself (it only does so for INTEGER, not BIGINT).
Id = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


class RunRecord(Base):
    """One run: what was asked, by whom, and how it ended. `params` has secret-looking values redacted."""

    __tablename__ = "runs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    workflow: Mapped[str] = mapped_column(String(200), index=True)
    version: Mapped[str] = mapped_column(String(64))
    params: Mapped[Any] = mapped_column(JSON)
    who: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20), index=True)
    created_at: Mapped[float] = mapped_column(Float, index=True)
    started_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    output: Mapped[Any | None] = mapped_column(JSON)
    errors: Mapped[Any | None] = mapped_column(JSON)
    error_summary: Mapped[Any | None] = mapped_column(JSON)
    fallback_run: Mapped[str | None] = mapped_column(String(64))
    definition: Mapped[Any | None] = mapped_column(JSON)  # the workflow as it ran: what `resume` rebuilds it from
    resumed_from: Mapped[str | None] = mapped_column(String(64), index=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))


class StepRecord(Base):
    """One step of a run, as it last stood."""

    __tablename__ = "steps"
    run_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    step_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    position: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20))
    service: Mapped[str] = mapped_column(String(200))
    tool: Mapped[str] = mapped_column(String(200))
    instance: Mapped[str | None] = mapped_column(String(200))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    duration_ms: Mapped[float | None] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    output: Mapped[Any | None] = mapped_column(JSON)
    output_id: Mapped[int | None] = mapped_column(Id)  # the full output in `outputs` when over OUTPUT_CAP
    output_size: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    error_type: Mapped[str | None] = mapped_column(String(200))
    attempt_errors: Mapped[Any | None] = mapped_column(JSON)
    served_by: Mapped[str | None] = mapped_column(String(400))
    skip_reason: Mapped[str | None] = mapped_column(String(20))
    stale_age_s: Mapped[float | None] = mapped_column(Float)
    worker: Mapped[str | None] = mapped_column(String(400))
    arguments_digest: Mapped[str | None] = mapped_column(String(64))
    reused_from: Mapped[str | None] = mapped_column(String(64))  # the run whose output a resumed run took


class OutputRecord(Base):
    """A step output too large for `steps.output`, kept whole as JSON text."""

    __tablename__ = "outputs"
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(64), index=True)
    step_id: Mapped[str] = mapped_column(String(200))
    body: Mapped[str] = mapped_column(Text)


class AuditRecord(Base):
    """One audited interaction or operation; `hash` covers every other column and the previous row's hash."""

    __tablename__ = "audit"
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    event_id: Mapped[str] = mapped_column(String(64), unique=True)
    at: Mapped[float] = mapped_column(Float, index=True)
    who: Mapped[str | None] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(40))
    run_id: Mapped[str | None] = mapped_column(String(64), index=True)
    step_id: Mapped[str | None] = mapped_column(String(200))
    service: Mapped[str | None] = mapped_column(String(200))
    instance: Mapped[str | None] = mapped_column(String(200))
    tool: Mapped[str | None] = mapped_column(String(200))
    arguments_digest: Mapped[str | None] = mapped_column(String(64))
    outcome: Mapped[str | None] = mapped_column(String(200))
    duration_ms: Mapped[float | None] = mapped_column(Float)
    worker: Mapped[str | None] = mapped_column(String(400))
    detail: Mapped[str | None] = mapped_column(Text)  # canonical JSON text: hashed as stored
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditHead(Base):
    """The chain's last row (one row, id 1): appends lock it, and verify sees rows cut off the end."""

    __tablename__ = "audit_head"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))


class HealthRecord(Base):
    """One health beat of one service instance: the history behind `services` (Redis keeps the latest)."""

    __tablename__ = "health"
    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)  # a replayed batch adds no row twice
    service: Mapped[str] = mapped_column(String(200), index=True)
    instance: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(10))
    at: Mapped[float] = mapped_column(Float, index=True)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    tools: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
