"""A step's time budget: its `timeout` bounds the whole step — every attempt, retry and backoff — from when
its first message is taken up; a fallback call gets a budget of its own."""

from __future__ import annotations

import time
from dataclasses import replace

from orchestrator.messages import StepCall
from workers.pipeline import Policy


class TimeBudget(Policy):
    """Sets when the call began and when its budget ends, once (a retried message carries both)."""

    options = ("timeout",)

    def starting(self, call: StepCall) -> StepCall:
        if call.started_at == 0.0:
            now = time.time()
            return replace(call, started_at=now, deadline=now + call.timeout)
        if call.deadline == 0.0:  # a fallback call, whose budget starts now
            return replace(call, deadline=time.time() + call.timeout)
        return call
