"""Retries of a failed call: a transient network fault is tried again at once, the next failures after an
exponential backoff with full jitter (the task is re-sent with a countdown, so no worker slot waits)."""

from __future__ import annotations

import time

from tenacity import RetryCallState, Retrying, wait_random_exponential

from orchestrator.errors import ToolError, TransportError
from orchestrator.messages import StepCall
from workers.pipeline import AGAIN, Attempt, Decision, Policy, Retry

BACKOFF = wait_random_exponential(multiplier=0.5, max=30)  # full jitter: uniform in [0, min(30, 0.5 * 2^n)]


class Retries(Policy):
    """Retries a transient failure (a tool's own error too, with `retry_tool_errors`) within the step's
    `retries` and time budget."""

    options = ("retries", "retry_tool_errors", "timeout")

    def failed(self, call: StepCall, error: Exception, attempt: Attempt) -> Decision | Retry | None:
        retryable = isinstance(error, TransportError) or (call.retry_tool_errors and isinstance(error, ToolError))
        remaining = call.deadline - time.time()
        if not retryable or call.attempt > call.retries or remaining <= 0:
            return None
        if call.attempt == 1 and isinstance(error, TransportError) and "timeout" not in str(error).lower():
            return AGAIN  # the first network fault
        state = RetryCallState(Retrying(), None, (), {})
        state.attempt_number = call.attempt
        countdown = BACKOFF(state)
        return Retry(call, countdown) if countdown < remaining else None
