"""Showing a run as it goes: a live table on a terminal, one plain line per change otherwise."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import IO

from rich.console import Console
from rich.live import Live
from rich.table import Table

from orchestrator.results import RunResult, StepResult

ICONS = {"pending": "·", "running": "…", "succeeded": "✔", "cached": "✔", "degraded": "◐", "stale-cache": "◐",
         "failed": "✘", "skipped": "↷", "cancelled": "■"}  # fmt: skip


def _event(run: RunResult, step_id: str, step: StepResult) -> str:
    call = f"{step.service}.{step.tool}"
    if step.status == "running":
        return f"run {run.id[:8]} step {step_id} ({call}) started"
    took = f" in {step.duration_ms:.0f} ms" if step.duration_ms is not None else ""
    detail = f": {step.error}" if step.error else ""
    return f"run {run.id[:8]} step {step_id} ({call}) {step.status}{took}{detail}"


def _table(run: RunResult) -> Table:
    table = Table(title=f"run {run.id} · {run.workflow} · {run.status}", title_justify="left")
    for column in ("", "step", "call", "status", "ms", "attempts", "detail"):
        table.add_column(column)
    for step_id, step in run.steps.items():
        duration = f"{step.duration_ms:.0f}" if step.duration_ms is not None else ""
        table.add_row(ICONS[step.status], step_id, f"{step.service}.{step.tool}", step.status, duration,
                      str(step.attempts or ""), (step.error or "")[:80])  # fmt: skip
    return table


def follow(
    load: Callable[[], RunResult], stream: IO[str], timeout: float | None = None, poll: float = 0.1
) -> RunResult:
    """Show the run until it ends (or the timeout passes) and return its last state."""
    console = Console(file=stream)
    deadline = None if timeout is None else time.monotonic() + timeout
    run = load()
    if console.is_terminal:
        with Live(_table(run), console=console, refresh_per_second=10, transient=False) as live:
            while not _over(run, deadline):
                time.sleep(poll)
                run = load()
                live.update(_table(run))
        return run
    seen: dict[str, str] = {}
    while True:
        for step_id, step in run.steps.items():
            if step.status != "pending" and seen.get(step_id) != step.status:
                seen[step_id] = step.status
                print(_event(run, step_id, step), file=stream, flush=True)
        if _over(run, deadline):
            return run
        time.sleep(poll)
        run = load()


def _over(run: RunResult, deadline: float | None) -> bool:
    return run.done or (deadline is not None and time.monotonic() > deadline)
