"""Records: run history and the audit chain in SQL (DATABASE_URL, else SQLite under MCPO_HOME)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

import click

from orchestrator.cli.common import (
    EXIT_FAILED,
    _authorize,
    _caller,
    _config_or_empty,
    _errors,
    _fail,
    _orchestrator,
    _settings,
    _when,
    config_option,
    main,
    run_shown,
)

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from orchestrator.history.records import RecordStore
    from orchestrator.security.access import AccessControl
    from orchestrator.security.identity import Identity


def _records() -> RecordStore:
    from orchestrator.history.records import RecordStore

    return RecordStore(_settings().records_url)


def _since(text: str | None) -> float | None:
    """--since: a duration back from now (90s, 30m, 2h, 7d) or a date/time (2026-01-31, 2026-01-31T12:00)."""
    if text is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[-1:] in units and text[:-1].replace(".", "", 1).isdigit():
        return time.time() - float(text[:-1]) * units[text[-1]]
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        _fail(f"--since {text!r}: expected a duration (90s, 30m, 2h, 7d) or a date (2026-01-31[T12:00])")


@main.command()
@click.option("--workflow", "-w", help="only runs of this workflow")
@click.option("--status", type=click.Choice(["pending", "running", "succeeded", "failed", "cancelled"]))
@click.option("--since", help="only runs created since: 90s, 30m, 2h, 7d, or a date like 2026-01-31")
@click.option("--limit", type=int, default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the runs as JSON")
@config_option
def runs(workflow: str | None, status: str | None, since: str | None, limit: int, as_json: bool,
         config_path: str | None) -> None:  # fmt: skip
    """Recent runs from the records, newest first: those of workflows the caller may read."""
    with _errors():
        start = _since(since)
        access, caller = _caller(config_path)
        if access is None or caller is None:
            found = _records().runs(workflow, status, start, limit)
        else:
            found = _readable_runs(access, caller, workflow, status, start, limit)
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    click.echo(f"{'RUN':32}  {'WORKFLOW':20} {'STATUS':10} {'CREATED':19}  WHO")
    for run in found:
        click.echo(
            f"{run['id']:32}  {run['workflow']:20} {run['status']:10} {_when(run['created_at']):19}  {run['who']}"
        )


def _readable_runs(access: AccessControl, caller: Identity, workflow: str | None, status: str | None,
                   since: float | None, limit: int) -> list[dict[str, Any]]:  # fmt: skip
    """Up to `limit` runs of workflows the caller may read; a caller who may read no workflow is refused."""
    policy = access.policy
    if workflow is not None:
        policy.check(caller, "read", f"workflow:{workflow}")
    elif not policy.grants_any(caller.roles, "read", "workflow"):
        policy.check(caller, "read", "workflow:*")  # refuses, and reports it
    asked = limit
    while True:  # the records filter by workflow glob only here: ask for more until enough are readable
        found = _records().runs(workflow, status, since, asked)
        readable = [run for run in found if policy.allows(caller.roles, "read", f"workflow:{run['workflow']}")]
        if len(readable) >= limit or len(found) < asked:
            return readable[:limit]
        asked *= 4


@main.command()
@run_shown
def show(run_id: str, config_path: str | None, as_json: bool, reveal: bool) -> None:
    """A run and each of its steps, from Redis while it holds the run, then from the records."""
    with _errors(), _orchestrator(_config_or_empty(config_path)) as orchestrator:
        result = orchestrator.status(run_id, reveal)
    if as_json:
        click.echo(result.model_dump_json(indent=2))
        return
    click.echo(f"run {result.id} ({result.workflow}) {result.status}, created {_when(result.created_at)}, "
               f"finished {_when(result.finished_at)}")  # fmt: skip
    for step_id, step in result.steps.items():
        took = f"{step.duration_ms:.1f} ms" if step.duration_ms is not None else "-"
        where = f"{step.service}/{step.instance or '-'}.{step.tool}"
        click.echo(f"  {step_id:24} {step.status:11} {where:40} attempts {step.attempts}  {took}")
    for error in result.errors:
        click.echo(f"  ✘ {error.step} ({error.service}.{error.tool}) {error.type}: {error.message}")


@contextmanager
def _audit_session(config_path: str | None) -> Iterator[Session]:
    """A session on the records once the caller may read the audit chain."""
    with _errors():
        _authorize(config_path, "audit", "audit")
    with _errors(), _records().session() as session:
        yield session


@main.group(name="audit")
def audit_group() -> None:
    """The audit chain: one row per MCP interaction and per operation, each carrying the previous row's hash."""


@audit_group.command()
@config_option
def verify(config_path: str | None) -> None:
    """Check the whole chain; names the first row edited, deleted or moved (exit 1)."""
    from orchestrator.history import audit

    with _audit_session(config_path) as session:
        count, problem = audit.verify(session)
    if problem is not None:
        _fail(f"{problem} (the {count} rows before it hold)", EXIT_FAILED)
    click.echo(f"ok: {count} audit rows, one unbroken chain")


@audit_group.command(name="export")
@click.option("--output", "-o", type=click.Path(dir_okay=False, writable=True), help="file to write (default: stdout)")
@click.option("--since", help="only rows since: 90s, 30m, 2h, 7d, or a date like 2026-01-31")
@config_option
def export_audit(output: str | None, since: str | None, config_path: str | None) -> None:
    """Write the audit rows as JSON lines (for a SIEM), in chain order."""
    from orchestrator.history import audit

    start = _since(since)
    with _audit_session(config_path) as session:
        if output is None:
            audit.export(session, sys.stdout, start)
            return
        with open(output, "w") as out:
            count = audit.export(session, out, start)
    click.echo(f"{count} audit rows written to {output}", err=True)


@main.group()
def db() -> None:
    """The records database (DATABASE_URL, else SQLite under MCPO_HOME)."""


@db.command()
@config_option
def upgrade(config_path: str | None) -> None:
    """Create or migrate the records schema to the newest version (admin on `records` when access is on)."""
    from orchestrator.history.records import describe

    with _errors():
        _authorize(config_path, "admin", "records")
    store = _records()
    with _errors():
        store.upgrade()
    click.echo(f"ok: {describe(store.url)} is at the newest schema")
