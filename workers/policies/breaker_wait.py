"""Waiting out a breaker's refusal of a call, in the broker rather than as a failure.

An open breaker sends no traffic to its server, but it need not fail the steps that would have called it: a step
that allows retries would have tried again after a failure anyway, and its retry budget was meant to outlast
faults like this one (a fan-out whose server process died: the breaker opened, and the calls cut off or not yet
made were refused). While such a step has time left, a refused call is sent again with a countdown, for when the
breaker lets a trial through. A step with an alternative takes it at once instead (its fallback service, or
the last good answer when it allows stale answers), and a step that allows no retries fails fast. The refusal
is not an attempt: no call was made, and the step's time budget bounds the wait.
"""

from __future__ import annotations

import random
import time

from orchestrator.errors import CircuitOpen
from orchestrator.messages import StepCall
from workers.pipeline import Policy, Retry

BUSY_TRIALS = 0.5  # seconds to wait for a half-open breaker's trials to end, before jitter
JITTER = 1.0  # up to this much more, so the refused retries of a fan-out do not all come back at once


def wait_out(call: StepCall, error: Exception) -> float | None:
    """The countdown after which to send a refused call again; None when the refusal stands (not a breaker
    refusal, a step that allows no retries, one with an alternative to take, or no time left for the wait)."""
    alternative = (call.fallback and not call.fallback_for) or call.use_stale
    if not isinstance(error, CircuitOpen) or call.retries == 0 or alternative:
        return None
    now = time.time()
    wait = error.retry_at - now if error.retry_at is not None else BUSY_TRIALS
    countdown = max(wait, 0.0) + random.uniform(0, JITTER)
    return countdown if now + countdown < call.deadline else None


class BreakerWait(Policy):
    """A call a breaker refused is sent again after the breaker's wait, while the step may still use it."""

    def refused(self, call: StepCall, error: Exception) -> Retry | None:
        countdown = wait_out(call, error)
        return None if countdown is None else Retry(call, countdown)
