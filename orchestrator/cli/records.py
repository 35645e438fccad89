"""Records: run history and the audit chain in SQL (DATABASE_URL, else SQLite under MCPO_HOME)."""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from typing import TYPE_CHECKING

import click

from orchestrator.cli.common import EXIT_FAILED, _errors, _fail, _orchestrator, _settings, _when, main

if TYPE_CHECKING:
    from orchestrator.records import RecordStore


def _records() -> RecordStore:
    from orchestrator.records import RecordStore

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
def runs(workflow: str | None, status: str | None, since: str | None, limit: int, as_json: bool) -> None:
    """Recent runs from the records, newest first."""
    with _errors():
        found = _records().runs(workflow, status, _since(since), limit)
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    click.echo(f"{'RUN':32}  {'WORKFLOW':20} {'STATUS':10} {'CREATED':19}  WHO")
    for run in found:
        click.echo(
            f"{run['id']:32}  {run['workflow']:20} {run['status']:10} {_when(run['created_at']):19}  {run['who']}"
        )


@main.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="print the RunResult as JSON")
@click.option("--reveal", is_flag=True, help="show sensitive values (sealed ones) instead of [sealed]")
def show(run_id: str, as_json: bool, reveal: bool) -> None:
    """A run and each of its steps, from Redis while it holds the run, then from the records."""
    from orchestrator.config import parse_config

    with _errors(), _orchestrator(parse_config({})) as orchestrator:
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


@main.group(name="audit")
def audit_group() -> None:
    """The audit chain: one row per MCP interaction and per operation, each carrying the previous row's hash."""


@audit_group.command()
def verify() -> None:
    """Check the whole chain; names the first row edited, deleted or moved (exit 1)."""
    from orchestrator import audit

    with _errors(), _records().session() as session:
        count, problem = audit.verify(session)
    if problem is not None:
        _fail(f"{problem} (the {count} rows before it hold)", EXIT_FAILED)
    click.echo(f"ok: {count} audit rows, one unbroken chain")


@audit_group.command(name="export")
@click.option("--output", "-o", type=click.Path(dir_okay=False, writable=True), help="file to write (default: stdout)")
@click.option("--since", help="only rows since: 90s, 30m, 2h, 7d, or a date like 2026-01-31")
def export_audit(output: str | None, since: str | None) -> None:
    """Write the audit rows as JSON lines (for a SIEM), in chain order."""
    from orchestrator import audit

    start = _since(since)
    with _errors(), _records().session() as session:
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
def upgrade() -> None:
    """Create or migrate the records schema to the newest version."""
    from orchestrator.records import describe

    store = _records()
    with _errors():
        store.upgrade()
    click.echo(f"ok: {describe(store.url)} is at the newest schema")
