"""Request batching: the calls of one parallel group to one service sent as a few messages rather than one each.

Celery's cost per message (decoding, the request, the pool's hand-off, the ack, the result and the chord's count)
is most of what a worker spends on a short call. A group of at least `min_group` calls to a service that batches
is sent as batch messages of up to `max_calls` calls (`mcpo.batch`, tasks/calls.py), whose worker makes them at
once; each call is still its own step everywhere else. Only a chord's header is batched (a group that a later
step or the run's finish waits for): a call that must retry, or go to its fallback, leaves its batch by joining
that chord. A group is split into at least as many batches as workers serve the queue (their heartbeats say so,
workers/reclaim.py), so that no worker sits idle while another holds the whole fan-out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from redis import Redis

if TYPE_CHECKING:  # this module is read by the workers' heartbeat (workers/reclaim.py), which loads no configuration
    from orchestrator.config import BatchSettings, Config

UNKNOWN_WORKERS = 2  # batches at least, when no heartbeat says how many workers serve a queue (a non-Redis broker)

# KEYS: the queue's set of serving workers. Returns how many still beat, by Redis's clock.
_SERVING = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZCOUNT', KEYS[1], now, '+inf')
"""


def serving_key(namespace: str, queue: str) -> str:
    """The sorted set of the workers that consume queue, each scored by the time its heartbeat runs out."""
    return f"{namespace}:serving:{queue}"


def workers_serving(redis: Redis, namespace: str, queue: str) -> int | None:
    """How many live workers consume queue; None when no worker ever said (workers beat only on a Redis broker)."""
    key = serving_key(namespace, queue)
    if not redis.exists(key):
        return None
    return int(redis.eval(_SERVING, 1, key))


@dataclass(frozen=True)
class Batching:
    """How the calls of one parallel group are sent: the batch settings of each service that batches, and how many
    workers serve a service's queue (asked once per service and enqueue)."""

    settings: Mapping[str, BatchSettings]
    workers: Callable[[str], int | None]

    @classmethod
    def of(cls, config: Config, workers: Callable[[str], int | None]) -> Batching:
        settings = {name: service.batch for name, service in config.services.items() if service.batch}
        return cls(settings, workers)

    def sizes(self, service: str, count: int) -> list[int]:
        """The sizes of the batches `count` calls to service go in; [] when they go one message each."""
        settings = self.settings.get(service)
        if settings is None or count < settings.min_group:
            return []
        workers = self.workers(service)
        spread = UNKNOWN_WORKERS if workers is None else workers
        batches = min(count, max(math.ceil(count / settings.max_calls), spread))
        base, extra = divmod(count, batches)
        return [base + 1] * extra + [base] * (batches - extra)
