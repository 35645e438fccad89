"""Instance choice and failover: each attempt goes to an instance its service's balancer leases (workers/balancer.py:
healthy, breaker closed, fewest calls in flight across the fleet, one this call failed on only when no other is
left); the lease ends with the attempt's outcome, a successful one in the round trip that records the result."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from redis.client import Pipeline as RedisPipeline

from orchestrator.errors import Cancelled, RateLimited, Throttled, ToolError, TransportError
from orchestrator.messages import StepCall
from orchestrator.results import StepResult
from workers.balancer import Ask, Balancer, Lease
from workers.pipeline import Attempt, Policy


class Placement(Policy):
    """Leases an instance to each attempt, and records the attempt's outcome in that instance's breaker."""

    def __init__(self, balancer: Balancer) -> None:
        self.balancer = balancer

    def reading(self, call: StepCall, pipe: RedisPipeline, attempt: Attempt) -> Callable[[list[Any]], None] | None:
        # A service of one instance has no choice to make first: its breaker is asked in the step's first trip.
        ask = self.balancer.ask_ahead(call.service, pipe)
        if ask is None:
            return None
        attempt.held[Ask] = ask
        return lambda replies: ask.answer(replies[0])

    def place(self, call: StepCall, attempt: Attempt) -> str:
        failed_on = {e["instance"] for e in call.attempt_errors if e["service"] == call.service}
        lease = self.balancer.lease(call.service, call.deadline, elsewhere=failed_on, ask=attempt.held.get(Ask))
        attempt.held[Lease] = lease
        return lease.instance

    def attempted(self, call: StepCall, attempt: Attempt, error: Exception | None, seconds: float) -> None:
        if error is None:
            return  # the lease ends with the result's record
        lease = attempt.held.pop(Lease, None)
        if lease is None:  # refused before an instance was chosen, or by the balancer itself
            return
        if isinstance(error, Throttled | RateLimited):  # a limit refused the call placed here: it was not made
            self.balancer.release(lease, None)
            if lease.permit is not None:
                lease.breaker.give_back(lease.permit)
        elif isinstance(error, ToolError):
            self.balancer.release(lease, False)  # the server answered: a tool's own error says nothing of its health
        elif isinstance(error, Cancelled):
            self.balancer.release(lease, None)  # the run was cancelled: says nothing of the server
        elif isinstance(error, TransportError):
            self.balancer.release(lease, True, session=error.session)  # a session's end counts once
            self.balancer.avoid(call.service, lease.instance)
        else:
            self.balancer.release(lease, True)

    def recording(self, call: StepCall, result: StepResult, pipe: RedisPipeline, attempt: Attempt) -> None:
        lease = attempt.held.pop(Lease, None)
        if lease is not None:
            self.balancer.release(lease, False, pipe)

    def done(self, call: StepCall, attempt: Attempt) -> None:
        ask = attempt.held.pop(Ask, None)
        if ask is not None:
            self.balancer.give_back(ask)  # asked ahead for a call that was not made (its step was skipped, say)
