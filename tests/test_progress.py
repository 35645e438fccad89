"""The progress view: a live table on a terminal, plain lines elsewhere."""

from __future__ import annotations

import io
from collections.abc import Callable

from orchestrator.progress import follow
from orchestrator.results import RunResult, StepResult


def states() -> Callable[[], RunResult]:
    """A run seen three times: pending, one step running, both done."""

    def run(status: str, a: str, b: str) -> RunResult:
        return RunResult(id="r1234567890", workflow="w", status=status, steps={  # type: ignore[arg-type]
            "a": StepResult(status=a, service="svc", tool="t1", duration_ms=5 if a == "succeeded" else None),  # type: ignore[arg-type]
            "b": StepResult(status=b, service="svc", tool="t2", error="boom" if b == "failed" else None),  # type: ignore[arg-type]
        })  # fmt: skip

    seen = iter([run("pending", "pending", "pending"), run("running", "running", "pending"),
                 run("failed", "succeeded", "failed")])  # fmt: skip
    last: list[RunResult] = []

    def load() -> RunResult:
        last[:] = [next(seen, last[0] if last else None)]  # type: ignore[list-item]
        return last[0]

    return load


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_when_not_a_terminal() -> None:
    stream = io.StringIO()
    result = follow(states(), stream, poll=0)
    assert result.status == "failed"
    assert stream.getvalue().splitlines() == [
        "run r1234567 step a (svc.t1) started",
        "run r1234567 step a (svc.t1) succeeded in 5 ms",
        "run r1234567 step b (svc.t2) failed: boom",
    ]


def test_live_table_on_a_terminal() -> None:
    stream = Terminal()
    result = follow(states(), stream, poll=0)
    assert result.status == "failed"
    text = stream.getvalue()
    assert "run r1234567890 · w · failed" in text and "svc.t2" in text and "boom" in text


def test_every_step_status_has_an_icon() -> None:
    from orchestrator.progress import ICONS
    from orchestrator.results import StepStatus

    assert set(ICONS) == set(StepStatus.__args__)  # type: ignore[attr-defined]
