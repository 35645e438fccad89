"""The per-call policies of a worker process, one module each, and the one order they run in."""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestrator.concurrency import ConcurrencyLimits
from orchestrator.rates import RateLimits
from orchestrator.registry import Registry
from orchestrator.responses import ResponseCache
from workers.pipeline import Policy
from workers.policies.breaker_wait import BreakerWait
from workers.policies.budget import TimeBudget
from workers.policies.cache import Caching
from workers.policies.caller import CallerCheck
from workers.policies.concurrency import ConcurrencyLimit
from workers.policies.degrade import Degradation
from workers.policies.fallback import FallbackService
from workers.policies.metrics import CallMetrics
from workers.policies.placement import Placement
from workers.policies.rate import RateLimit
from workers.policies.recording import Recording
from workers.policies.retry import Retries
from workers.policies.sealing import Sealing
from workers.policies.stale import StaleAnswers

__all__ = ["BreakerWait", "CallMetrics", "CallerCheck", "Caching", "ConcurrencyLimit", "Degradation", "FallbackService",
           "Placement", "RateLimit", "Recording", "Retries", "Sealing", "StaleAnswers", "TimeBudget",
           "in_order"]  # fmt: skip

if TYPE_CHECKING:
    from orchestrator.config import Config
    from orchestrator.runs import RunStore
    from workers.balancer import Balancer
    from workers.credentials import Credentials
    from workers.guard import CallGuard


def in_order(store: RunStore, balancer: Balancer, guard: CallGuard | None, config: Config,
             credentials: Credentials) -> list[Policy]:  # fmt: skip
    """Every policy, in the order the pipeline asks them."""
    limits = {name: service.limits for name, service in config.services.items()}
    cache = ResponseCache(store.redis, store.namespace)
    registry = Registry(store.redis, store.namespace)
    return [
        TimeBudget(),  # the step's budget starts when its first message is taken up
        *([CallerCheck(guard)] if guard is not None else []),  # the caller's token, before any MCP traffic
        # A kept answer, or one another call is fetching: no slot, no lease, no MCP traffic.
        Caching(cache, config, registry, credentials, guard),
        # The fleet's limits, rates first: a call without a valid token takes no slot and no lease, and one that
        # finds no slot takes no lease. Metrics still count each refusal: every policy hears of every attempt.
        RateLimit(RateLimits(store.redis, store.namespace, limits), guard),
        ConcurrencyLimit(ConcurrencyLimits(store.redis, store.namespace, limits)),
        Placement(balancer),  # then an instance: healthy, its breaker closed, the least busy across the fleet
        CallMetrics(),  # every attempt counted, whatever the policies after it decide
        BreakerWait(),  # a call a breaker refused waits in the broker while the step has time and no alternative
        Retries(),  # a transient failure: again at once the first time, then backoff with jitter
        FallbackService(),  # no retry left: the step's fallback service
        StaleAnswers(store),  # else the last good answer to the same call, when the step allows one
        Degradation(),  # else an optional step is degraded, not failed
        Sealing(),  # a sensitive step's result sealed before it is recorded
        Recording(store),  # the result and its record event, in the round trip that ends the call
    ]
