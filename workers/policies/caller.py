"""The caller's token, checked by the worker before any MCP traffic leaves (workers/guard.py holds the check)."""

from __future__ import annotations

from orchestrator.messages import StepCall
from workers.guard import CallGuard
from workers.pipeline import Policy


class CallerCheck(Policy):
    """Refuses a call whose message carries no valid caller token for its run (access control on)."""

    def __init__(self, guard: CallGuard) -> None:
        self.guard = guard

    def refusal(self, call: StepCall) -> str | None:
        return self.guard.refusal(call)
