"""The fleet's concurrency limits (a service's `limits:`): a call over one waits in the broker, never in a worker slot.

Before each attempt a limited call takes a lease on every limit of its service and tool (orchestrator/concurrency.py),
named by this worker and the attempt, and after the attempt, however it ended, gives them back. A call that finds a
limit full is refused without MCP traffic and sent again after a short countdown with jitter (sooner if the limit's
soonest lease ends sooner) while its step has time; the refusal is not an attempt. When the step's deadline would
pass first, the refusal stands (`concurrency limit of N reached for service X`) and the policies after this one
decide, as for any failure. A service without limits costs nothing here: no round trip to Redis.
"""

from __future__ import annotations

import random
import time
import uuid

from orchestrator.concurrency import Bound, ConcurrencyLimits
from orchestrator.errors import Throttled
from orchestrator.messages import StepCall
from workers import reclaim
from workers.pipeline import Attempt, Policy, Retry

WAIT = (0.2, 1.0)  # seconds before a refused call asks again: spread, so a fan-out's refusals come back apart


class ConcurrencyLimit(Policy):
    """Holds each attempt of a limited call to its service's and tool's concurrency limits across the fleet."""

    def __init__(self, limits: ConcurrencyLimits) -> None:
        self.limits = limits

    def admit(self, call: StepCall, attempt: Attempt) -> None:
        bounds = self.limits.bounds(call.service, call.tool)
        if not bounds:
            return
        beat = reclaim.heartbeat()
        holder = f"{beat[0] if beat else ''}|{uuid.uuid4().hex}"
        refusal = self.limits.acquire(bounds, holder, call.deadline, beat[1] if beat else None)
        if refusal is not None:
            bound = refusal.bound
            message = f"concurrency limit of {bound.concurrency} reached for {bound.scope}"
            raise Throttled(message, retry_at=refusal.soonest)
        attempt.held[Bound] = (bounds, holder)

    def attempted(self, call: StepCall, attempt: Attempt, error: Exception | None, seconds: float) -> None:
        # Only an attempt that was admitted holds leases: a refused one (Throttled) has nothing to give back.
        held = attempt.held.pop(Bound, None)
        if held is not None:
            self.limits.release(*held)

    def refused(self, call: StepCall, error: Exception) -> Retry | None:
        if not isinstance(error, Throttled):
            return None
        now = time.time()
        countdown = random.uniform(*WAIT)
        if error.retry_at is not None:
            countdown = min(countdown, max(error.retry_at - now, 0.0))
        return Retry(call, countdown) if now + countdown < call.deadline else None
