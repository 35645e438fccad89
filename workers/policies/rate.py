"""The fleet's rate limits (a service's `limits: {rate, per_caller, tools: {T: {rate}}}`): a call over one waits in
the broker for the slot it was given, never in a worker slot and never by failing its step.

Before each attempt a rate-limited call asks for a slot under every rate that applies to it (orchestrator/rates.py):
one free now lets it through; a later one is kept for it, and the call is sent again with a countdown to that
slot, which its redelivery then takes. A slot past the step's deadline is not given: the refusal stands
(`rate limit of 20/s reached for service X`) and the policies after this one decide, as for any failure. A service
without rates costs nothing here: no round trip to Redis.
"""

from __future__ import annotations

import time

from orchestrator.errors import RateLimited
from orchestrator.messages import StepCall
from orchestrator.rates import RateLimits
from workers.guard import CallGuard
from workers.pipeline import Attempt, Policy, Retry


class RateLimit(Policy):
    """Holds each attempt of a rate-limited call to its service's, tool's and caller's rates across the fleet."""

    def __init__(self, limits: RateLimits, guard: CallGuard | None) -> None:
        self.limits = limits
        self.guard = guard

    def admit(self, call: StepCall, attempt: Attempt) -> None:
        caller = self.guard.subject(call) if self.guard is not None else None
        bounds = self.limits.bounds(call.service, call.tool, caller)
        if not bounds:
            return
        key = f"{call.run_id}:{call.step_id}:{call.attempt}"
        wait = self.limits.take(bounds, key, call.deadline - time.time())
        if wait == 0:
            return
        scope = " and ".join(f"{bound.rate} for {bound.scope}" for bound in bounds)
        raise RateLimited(f"rate limit of {scope} reached", retry_at=time.time() + wait if wait is not None else None)

    def refused(self, call: StepCall, error: Exception) -> Retry | None:
        if not isinstance(error, RateLimited) or error.retry_at is None:
            return None
        return Retry(call, max(error.retry_at - time.time(), 0.0))
