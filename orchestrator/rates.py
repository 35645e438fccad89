"""Rate limits per service, per tool and per caller, held across the whole fleet in Redis.

Each limit is a generic cell rate algorithm (GCRA, a token bucket of one): calls are spaced evenly, one every
`period / count` seconds, with no burst, so `"20/s"` holds over any window, not only on average. A limit keeps one
Redis key, the time its next call may go. A call under every limit that applies goes at once; one over them is
given the next free slot on all of them at once (a reservation, so a fan-out's calls queue in order instead of
racing for each slot again) and waits for it in the broker; when its slot comes, the reservation lets it through.
A slot later than the call's deadline is not taken: the refusal stands, and the step's policies decide.

One Lua script does it all, timed by Redis's clock, so workers whose clocks differ share the same slots.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from pydantic import BeforeValidator
from redis import Redis

if TYPE_CHECKING:
    from orchestrator.concurrency import ServiceLimits

PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0}
EARLY = 0.005  # seconds a call may come before its slot and still go (the broker's countdowns are not exact)
LATE = 0.1  # seconds it may come after its slot, at least (and one interval of its limits, if longer)

# KEYS: the call's reservation, then each limit's key. ARGV: the longest the call may wait, how early and how late
# a call may come for its slot, then each limit's interval between calls (all in seconds). Returns {1} when the
# call may go now, {0, wait} when it holds a slot `wait` seconds away, {-1, wait} when the next slot is further
# away than it may wait (nothing is taken). A call later than `late` for its slot lost it (its redelivery was held
# up: taking it now would send a burst of such calls at once) and queues for the next free one.
TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local early = tonumber(ARGV[2])
local reserved = tonumber(redis.call('GET', KEYS[1]))
if reserved then
  if reserved > now + early then return {0, tostring(reserved - now)} end
  redis.call('DEL', KEYS[1])
  if now - reserved <= tonumber(ARGV[3]) then return {1} end
end
local at = now
for i = 2, #KEYS do
  local next_call = tonumber(redis.call('GET', KEYS[i]))
  if next_call and next_call > at then at = next_call end
end
local wait = at - now
if wait > tonumber(ARGV[1]) then return {-1, tostring(wait)} end
for i = 2, #KEYS do
  local after = at + tonumber(ARGV[i + 2])
  redis.call('SET', KEYS[i], tostring(after), 'PX', math.ceil((after - now) * 1000) + 1000)
end
if wait <= early then return {1} end
redis.call('SET', KEYS[1], tostring(at), 'PX', math.ceil(wait * 1000) + 60000)
return {0, tostring(wait)}
"""


@dataclass(frozen=True)
class Rate:
    """`count` calls per `period` seconds, written `"100/s"`, `"5/m"` or `"1000/h"`."""

    count: int
    period: float

    @property
    def interval(self) -> float:
        return self.period / self.count

    def __str__(self) -> str:
        unit = next(name for name, seconds in PERIODS.items() if seconds == self.period)
        return f"{self.count}/{unit}"


def parse_rate(value: object) -> Rate:
    """A rate as written in a configuration; a clear error for anything else."""
    if isinstance(value, Rate):
        return value
    match = re.fullmatch(r"\s*(\d+)\s*/\s*([smh])\s*", value) if isinstance(value, str) else None
    if match is None or int(match.group(1)) < 1:
        raise ValueError(f"a rate is written COUNT/UNIT with COUNT ≥ 1 and UNIT s, m or h (\"100/s\", \"5/m\"), not "
                         f"{value!r}")  # fmt: skip
    return Rate(int(match.group(1)), PERIODS[match.group(2)])


RateField = Annotated[Rate, BeforeValidator(parse_rate)]


@dataclass(frozen=True)
class RateBound:
    """One rate limit that applies to a call: its key, its rate, and what it limits."""

    key: str
    rate: Rate
    scope: str  # "service X", "tool X.T" or "caller S on service X", for the refusal's message


class RateLimits:
    """The fleet's rate limits, as one worker process asks for slots under them."""

    def __init__(self, redis: Redis, namespace: str, services: Mapping[str, ServiceLimits]) -> None:
        self._prefix = f"{namespace}:rate"
        self._services = {name: limits for name, limits in services.items() if limits.has("rate") or limits.per_caller}
        self._take = redis.register_script(TAKE)

    def bounds(self, service: str, tool: str, caller: str | None) -> list[RateBound]:
        """The rate limits a call of `tool` on `service` by `caller` is held to; none, without asking Redis, for a
        service without any."""
        limits = self._services.get(service)
        if limits is None:
            return []
        bounds = [RateBound(f"{self._prefix}:{key}", rate, scope) for key, scope, rate in
                  limits.applying(service, tool, "rate")]  # fmt: skip
        if limits.per_caller is not None and caller is not None:
            scope = f"caller {caller} on service {service}"
            bounds.append(RateBound(f"{self._prefix}:caller:{service}:{caller}", limits.per_caller, scope))
        return bounds

    def take(self, bounds: list[RateBound], call: str, max_wait: float) -> float | None:
        """A slot for `call` (a key naming one attempt of one step: its redelivery finds its reservation) under
        every bound: 0 when the call may go now, the seconds until the slot kept for it, or None when no slot comes
        within `max_wait` seconds (nothing is taken)."""
        keys = [f"{self._prefix}:reserved:{call}", *(bound.key for bound in bounds)]
        intervals = [bound.rate.interval for bound in bounds]
        late = max(LATE, min(intervals))
        reply = self._take(keys=keys, args=[repr(max(max_wait, 0.0)), repr(EARLY), repr(late), *map(repr, intervals)])
        if int(reply[0]) == 1:
            return 0.0
        return float(reply[1]) if int(reply[0]) == 0 else None
