"""Sealing: a sensitive step's output and errors are sealed before they are recorded, as its arguments were
before they were sent (orchestrator/security/sealing.py)."""

from __future__ import annotations

from orchestrator.messages import StepCall
from orchestrator.results import StepResult
from orchestrator.security.sealing import seal_result
from workers.pipeline import Policy


class Sealing(Policy):
    """Seals the result of a sensitive step."""

    options = ("sensitive",)

    def finishing(self, call: StepCall, result: StepResult) -> StepResult:
        return seal_result(result) if call.sensitive else result
