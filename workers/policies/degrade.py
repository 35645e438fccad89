"""Graceful degradation: an optional step that failed for good is `degraded`, and the run goes on."""

from __future__ import annotations

from orchestrator.messages import StepCall
from workers.pipeline import SETTLED, Attempt, Decision, Policy


class Degradation(Policy):
    """Settles an optional step's final failure as `degraded`."""

    options = ("optional",)

    def failed(self, call: StepCall, error: Exception, attempt: Attempt) -> Decision | None:
        if not call.optional:
            return None
        attempt.result.status = "degraded"
        return SETTLED
