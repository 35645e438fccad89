"""Concurrency limits per service and per tool, held across the whole fleet in Redis.

A limited call holds a lease on every limit that applies to it (its service's, its tool's) for each attempt: one
sorted set per limit, each member an attempt, scored by its call's deadline, so a worker that dies mid-call leaves
no lease behind once that deadline has passed. Waiting that long would starve the calls queued behind a dead
worker's leases, whose deadlines are much the same; so a holder also names its worker (`<worker>|<id>`), and a
limit found full drops the leases of workers that stopped beating (workers/reclaim.py keeps the beats, on the
broker's Redis: where that is another server, deadlines alone end leases). A duplicate delivery of a call is an
attempt of its own, with a lease of its own: the limit holds for it too.

Acquiring is one Lua script (drop the expired and the dead, check every limit, take all of them or none) and
releasing another: one round trip each, atomic across workers, timed by Redis's clock so that a worker whose clock
runs ahead cannot end the others' leases early.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator
from redis import Redis

from orchestrator.rates import RateField

# KEYS: the workers' heartbeats (a sorted set of worker -> beat deadline in ms; absent: none are kept here), then
# the limits' sorted sets. ARGV: the holder, its deadline (epoch seconds), then each limit's size.
# Returns {0} when every lease is taken, else {i, soonest}: limit i is full, its soonest lease ends at `soonest`.
ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local beats, holder, deadline = KEYS[1], ARGV[1], ARGV[2]
local watched = redis.call('EXISTS', beats) == 1
local function dead(other)
  local worker = string.match(other, '^(.-)|')
  if not watched or worker == nil or worker == '' then return false end
  local beat = redis.call('ZSCORE', beats, worker)
  return not beat or tonumber(beat) < now * 1000
end
for i = 2, #KEYS do
  local key, size = KEYS[i], tonumber(ARGV[i + 1])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  local count = redis.call('ZCARD', key)
  if count >= size then
    for _, other in ipairs(redis.call('ZRANGE', key, 0, -1)) do
      if dead(other) then count = count - redis.call('ZREM', key, other) end
    end
    if count >= size then return {i - 1, redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')[2]} end
  end
end
for i = 2, #KEYS do
  redis.call('ZADD', KEYS[i], deadline, holder)
  local last = redis.call('ZRANGE', KEYS[i], -1, -1, 'WITHSCORES')[2]
  redis.call('EXPIREAT', KEYS[i], math.ceil(tonumber(last)) + 1)
end
return {0}
"""

# KEYS: the limits' sorted sets. ARGV: the holder.
RELEASE = """
for _, key in ipairs(KEYS) do redis.call('ZREM', key, ARGV[1]) end
return 1
"""


class ToolLimits(BaseModel):
    """`limits.tools.TOOL` of a service: how many calls of that tool may run at once across the fleet, and how
    often they may start."""

    model_config = ConfigDict(extra="forbid")
    concurrency: StrictInt | None = Field(default=None, ge=1)
    rate: RateField | None = None

    @model_validator(mode="after")
    def _says_something(self) -> ToolLimits:
        if self.concurrency is None and self.rate is None:
            raise ValueError("give `concurrency`, `rate` or both")
        return self


class ServiceLimits(BaseModel):
    """A service's `limits:` block, absent meaning unlimited: calls in flight at once across the fleet, for the
    whole service (`concurrency`) and per tool (`tools`); calls started, for the whole service (`rate`), per tool,
    and per caller (`per_caller`, which needs access control to tell callers apart): orchestrator/rates.py."""

    model_config = ConfigDict(extra="forbid")
    concurrency: StrictInt | None = Field(default=None, ge=1)
    rate: RateField | None = None
    per_caller: RateField | None = None
    tools: dict[str, ToolLimits] = Field(default_factory=dict)

    def has(self, kind: str) -> bool:
        """Whether any limit of `kind` ("concurrency" or "rate") is set, for the service or one of its tools."""
        return getattr(self, kind) is not None or any(getattr(t, kind) is not None for t in self.tools.values())

    def applying(self, service: str, tool: str, kind: str) -> list[tuple[str, str, Any]]:
        """(key, scope, value) of each `kind` limit a call of `tool` is held to: the service's, then the tool's."""
        found = []
        if (value := getattr(self, kind)) is not None:
            found.append((f"service:{service}", f"service {service}", value))
        if tool in self.tools and (value := getattr(self.tools[tool], kind)) is not None:
            found.append((f"tool:{service}:{tool}", f"tool {service}.{tool}", value))
        return found


@dataclass(frozen=True)
class Bound:
    """One limit that applies to a call: its sorted set, how many calls it lets in, and what it limits."""

    key: str
    concurrency: int
    scope: str  # "service X" or "tool X.T", for the refusal's message


@dataclass(frozen=True)
class Refusal:
    """A limit that was full: which one, and when its soonest lease ends (epoch seconds)."""

    bound: Bound
    soonest: float


class ConcurrencyLimits:
    """The fleet's concurrency limits, as one worker process asks for and gives back leases on them."""

    def __init__(self, redis: Redis, namespace: str, services: Mapping[str, ServiceLimits]) -> None:
        self._prefix = f"{namespace}:concurrency"
        self._limits = {name: limits for name, limits in services.items() if limits.has("concurrency")}
        self._acquire = redis.register_script(ACQUIRE)
        self._release = redis.register_script(RELEASE)

    def bounds(self, service: str, tool: str) -> list[Bound]:
        """The limits a call of `tool` on `service` is held to; none for an unlimited service, without asking
        Redis."""
        limits = self._limits.get(service)
        found = limits.applying(service, tool, "concurrency") if limits is not None else []
        return [Bound(f"{self._prefix}:{key}", concurrency, scope) for key, scope, concurrency in found]

    def acquire(
        self, bounds: list[Bound], holder: str, deadline: float, heartbeats: str | None = None
    ) -> Refusal | None:
        """Take a lease for `holder` on every bound, ending at `deadline`, or on none of them: None when taken,
        else the first bound that was full. A holder `<worker>|<id>` whose worker has stopped beating in
        `heartbeats` gives its place up (see above)."""
        keys = [heartbeats or f"{self._prefix}:no-heartbeats", *(bound.key for bound in bounds)]
        reply = self._acquire(keys=keys, args=[holder, repr(deadline), *(bound.concurrency for bound in bounds)])
        if int(reply[0]) == 0:
            return None
        return Refusal(bounds[int(reply[0]) - 1], float(reply[1]))

    def release(self, bounds: list[Bound], holder: str) -> None:
        """Give back the leases `holder` took on every bound."""
        self._release(keys=[bound.key for bound in bounds], args=[holder])
