"""A circuit breaker whose state lives in Redis, shared by every worker (resilience4j's semantics).

closed: calls flow; the outcomes of the last `window_size` calls are kept, and once `minimum_calls`
have been seen, a failure rate or slow-call rate at or over its threshold opens the breaker.
open: every call is refused at once until `wait_in_open` has passed; then the next ask moves it to
half-open. half-open: exactly `permitted_calls_in_half_open` trial calls are let through, however many
workers ask at once; when they have all ended, their failure and slow rates close or re-open it. Trials
that have not all reported one wait after they began (a worker died mid-call) give way to new trials.

Each ask and each record is one Lua script: one round trip, atomic across processes. A breaker state
has a generation: an outcome recorded under an older generation (a call let through before the last
transition) changes nothing. Health beats feed it too (`beat`): a failed beat counts as a failed call, a
passing beat on an open breaker moves it to half-open at once.

A crash counts once: the calls that one MCP session's end fails (a stdio server process killed with 35 calls in
flight) name that session when they are recorded, and only the first of them counts; the session is remembered
for `CRASH_MEMORY` seconds, much longer than its calls take to report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field
from redis import Redis
from redis.client import Pipeline
from redis.commands.core import Script

from orchestrator.scripts import Lua
from orchestrator.text import as_text

State = Literal["closed", "open", "half_open"]
CRASH_MEMORY = 600  # seconds a session whose end was counted is remembered

_NOW = """
local now = tonumber(ARGV[1])
if now == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

ACQUIRE = (
    _NOW
    + """
local key, permitted, wait_ms = KEYS[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HGET', key, 'state') or 'closed'
local gen = tonumber(redis.call('HGET', key, 'gen') or '0')
if state == 'open' then
  local reopen = tonumber(redis.call('HGET', key, 'open_until'))
  if now < reopen then return {0, state, gen, reopen} end
  gen = gen + 1
  state = 'half_open'
  redis.call('HSET', key, 'state', state, 'gen', gen, 'trials', 0, 'trial_done', 0, 'trial_fails', 0,
             'trial_slows', 0, 'changed_at', now)
end
if state == 'half_open' then
  if tonumber(redis.call('HGET', key, 'trials') or '0') >= permitted then
    if now < tonumber(redis.call('HGET', key, 'changed_at')) + wait_ms then return {0, state, gen, 0} end
    -- Trials that never reported within a wait (their worker died mid-call): let new trials go.
    gen = gen + 1
    redis.call('HSET', key, 'gen', gen, 'trials', 0, 'trial_done', 0, 'trial_fails', 0, 'trial_slows', 0,
               'changed_at', now)
  end
  redis.call('HINCRBY', key, 'trials', 1)
end
return {1, state, gen, 0}
"""
)

RECORD = (
    _NOW
    + """
local key, window = KEYS[1], KEYS[2]
local gen, failed, slow = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local size, minimum = tonumber(ARGV[5]), tonumber(ARGV[6])
local fail_pct, slow_pct = tonumber(ARGV[7]), tonumber(ARGV[8])
local wait_ms, permitted = tonumber(ARGV[9]), tonumber(ARGV[10])
local state = redis.call('HGET', key, 'state') or 'closed'
local current = tonumber(redis.call('HGET', key, 'gen') or '0')
if gen < 0 then
  -- A health beat, not a permitted call: it counts in whatever generation is current, never while open.
  if state == 'open' then return {state, current} end
  gen = current
end
if current ~= gen then return {state, current} end
if KEYS[3] and not redis.call('SET', KEYS[3], 1, 'NX', 'EX', ARGV[11]) then
  -- Another call that this session's end failed was counted: one crash is one failure. A half-open trial this
  -- call held goes back, so the trials that run decide.
  if state == 'half_open' and tonumber(redis.call('HGET', key, 'trials') or '0') > 0 then
    redis.call('HINCRBY', key, 'trials', -1)
  end
  return {state, current}
end
local function over(fails, slows, calls)
  return fails * 100 >= fail_pct * calls or slows * 100 >= slow_pct * calls
end
local function move(to, fails, slows, calls)
  redis.call('DEL', window)
  redis.call('HSET', key, 'state', to, 'gen', current + 1, 'fails', 0, 'slows', 0, 'changed_at', now)
  if to == 'open' then
    redis.call('HSET', key, 'open_until', now + wait_ms, 'opened_at', now,
               'trip_fail_rate', fails * 100 / calls, 'trip_slow_rate', slows * 100 / calls, 'trip_calls', calls)
  end
  return {to, current + 1}
end
if state == 'closed' then
  local calls = redis.call('RPUSH', window, failed + 2 * slow)
  local fails = redis.call('HINCRBY', key, 'fails', failed)
  local slows = redis.call('HINCRBY', key, 'slows', slow)
  if calls > size then
    local oldest = tonumber(redis.call('LPOP', window))
    -- 0 - x, not -x: Lua's -0 reaches Redis as "-0", which HINCRBY refuses.
    fails = redis.call('HINCRBY', key, 'fails', 0 - oldest % 2)
    slows = redis.call('HINCRBY', key, 'slows', 0 - math.floor(oldest / 2))
    calls = size
  end
  if calls >= minimum and over(fails, slows, calls) then return move('open', fails, slows, calls) end
elseif state == 'half_open' then
  local done = redis.call('HINCRBY', key, 'trial_done', 1)
  local fails = redis.call('HINCRBY', key, 'trial_fails', failed)
  local slows = redis.call('HINCRBY', key, 'trial_slows', slow)
  if done >= permitted then
    if over(fails, slows, done) then return move('open', fails, slows, done) end
    return move('closed', fails, slows, done)
  end
end
return {state, current}
"""
)


# A passing health beat on an open breaker: the server answers again, so let trial calls find out now
# rather than after the rest of the wait.
PROBE = (
    _NOW
    + """
local key = KEYS[1]
if redis.call('HGET', key, 'state') ~= 'open' then return 0 end
redis.call('HSET', key, 'state', 'half_open', 'gen', tonumber(redis.call('HGET', key, 'gen')) + 1, 'trials', 0,
           'trial_done', 0, 'trial_fails', 0, 'trial_slows', 0, 'changed_at', now)
return 1
"""
)


# A permit asked for ahead of a call that then was not made (its step was skipped): a half-open trial goes
# back, so the trials that do run decide the state.
GIVE_BACK = """
local key, gen = KEYS[1], tonumber(ARGV[1])
if redis.call('HGET', key, 'state') ~= 'half_open' or tonumber(redis.call('HGET', key, 'gen')) ~= gen then return 0 end
if tonumber(redis.call('HGET', key, 'trials') or '0') > 0 then redis.call('HINCRBY', key, 'trials', -1) end
return 1
"""


class BreakerSettings(BaseModel):
    """A service's breaker settings (the `breaker:` block of a service); the defaults suit most fleets."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    window_size: int = Field(default=20, ge=1)
    minimum_calls: int = Field(default=10, ge=1)
    failure_rate_threshold: float = Field(default=50.0, gt=0, le=100)
    slow_call_duration: float = Field(default=30.0, gt=0)
    slow_call_rate_threshold: float = Field(default=100.0, gt=0, le=100)
    wait_in_open: float = Field(default=30.0, ge=0)
    permitted_calls_in_half_open: int = Field(default=3, ge=1)


@dataclass(frozen=True)
class Permit:
    """The answer to one ask: whether the call may go, and the breaker state it was asked in."""

    allowed: bool
    state: State
    generation: int
    retry_at: float | None  # epoch seconds when an open breaker lets a trial through


@dataclass(frozen=True)
class Snapshot:
    """A breaker as the CLI and API show it."""

    state: State
    failure_rate: float | None
    slow_rate: float | None
    calls: int
    retry_at: float | None
    changed_at: float | None


class CircuitBreaker:
    """One breaker in Redis, for one service instance."""

    @classmethod
    def of(cls, redis: Redis, namespace: str, service: str, instance: str, settings: BreakerSettings) -> CircuitBreaker:
        """The breaker every worker shares for one instance of a service."""
        return cls(redis, f"{namespace}:breaker:{service}:{instance}", settings)

    def __init__(self, redis: Redis, key: str, settings: BreakerSettings) -> None:
        self.key = key
        self.window_key = f"{key}:window"
        self.settings = settings
        self._redis = redis
        self._acquire = redis.register_script(ACQUIRE)
        self._record = redis.register_script(RECORD)
        self._queued = {ACQUIRE: Lua(ACQUIRE), RECORD: Lua(RECORD)}
        self._probe = redis.register_script(PROBE)
        self._give_back = redis.register_script(GIVE_BACK)

    def acquire(self, now: float | None = None) -> Permit:
        """Ask to make one call (one round trip)."""
        return self.permit(self._ask(now, None))

    def ask(self, pipe: Pipeline) -> None:
        """Queue an ask on `pipe`, to share a round trip the caller makes anyway (executed with
        `orchestrator.scripts.execute`); `permit` reads its reply."""
        self._ask(None, pipe)

    def _ask(self, now: float | None, pipe: Pipeline | None) -> Any:
        s = self.settings
        args = [_ms(now), s.permitted_calls_in_half_open, int(s.wait_in_open * 1000)]
        return self._run(self._acquire, [self.key], args, pipe)

    def _run(self, script: Script, keys: list[str], args: list[Any], pipe: Pipeline | None) -> Any:
        """Run a script now, or queue it on `pipe` by its SHA (orchestrator/scripts.py says why)."""
        if pipe is None:
            return script(keys=keys, args=args)
        self._queued[cast(str, script.script)].queue(pipe, keys, args)  # registered from str sources
        return None

    @staticmethod
    def permit(reply: Any) -> Permit:
        """The permit an ask's reply grants."""
        allowed, state, generation, reopen = reply
        return Permit(bool(allowed), _state(state), int(generation), int(reopen) / 1000 if reopen else None)

    def give_back(self, permit: Permit) -> None:
        """Return a permit whose call was not made: a half-open trial is freed for another call."""
        if permit.allowed and permit.state == "half_open":
            self._give_back(keys=[self.key], args=[permit.generation])

    def record(
        self,
        permit: Permit,
        failed: bool,
        duration: float,
        now: float | None = None,
        pipe: Pipeline | None = None,
        session: str | None = None,
    ) -> State | None:
        """Record a permitted call's outcome (one round trip); returns the state after it, or None when
        queued on `pipe` for the caller to execute (with `orchestrator.scripts.execute`). A failure that names
        the MCP session whose end caused it counts only if no other call of that session's was counted."""
        s = self.settings
        slow = duration >= s.slow_call_duration
        args = [_ms(now), permit.generation, int(failed), int(slow), s.window_size, s.minimum_calls,
                s.failure_rate_threshold, s.slow_call_rate_threshold, int(s.wait_in_open * 1000),
                s.permitted_calls_in_half_open, CRASH_MEMORY]  # fmt: skip
        keys = [self.key, self.window_key, *([f"{self.key}:crash:{session}"] if failed and session else [])]
        reply = self._run(self._record, keys, args, pipe)
        return None if pipe is not None else _state(reply[0])

    def beat(self, passed: bool, now: float | None = None) -> State:
        """Feed a health beat: a failed one counts as a failed call (a failed trial when half-open); a
        passing one moves an open breaker to half-open. Returns the state after it."""
        if passed:
            self._probe(keys=[self.key], args=[_ms(now)])
            return self.snapshot().state
        state = self.record(Permit(True, "closed", -1, None), True, 0.0, now)
        assert state is not None
        return state

    def snapshot(self) -> Snapshot:
        pipe = self._redis.pipeline(transaction=False)
        pipe.hgetall(self.key)
        pipe.llen(self.window_key)
        fields, calls = pipe.execute()
        data: dict[str, Any] = {k.decode(): v.decode() for k, v in fields.items()}
        state = _state(data.get("state", "closed"))
        if state != "closed" and "trip_calls" in data:  # the rates that opened it
            rates = float(data["trip_fail_rate"]), float(data["trip_slow_rate"])
            reopen = int(data["open_until"]) / 1000 if state == "open" else None
            return Snapshot(state, *rates, int(data["trip_calls"]), reopen, int(data["changed_at"]) / 1000)
        calls = min(int(calls), self.settings.window_size)
        changed = int(data["changed_at"]) / 1000 if "changed_at" in data else None
        fails, slows = (100.0 * int(data.get(name, 0)) / calls if calls else None for name in ("fails", "slows"))
        return Snapshot(state, fails, slows, calls, None, changed)

    def reset(self) -> None:
        self._redis.delete(self.key, self.window_key)


def _state(value: Any) -> State:
    return cast(State, as_text(value))


def _ms(now: float | None) -> int:
    """Milliseconds for the scripts; 0 asks them to use the Redis server's clock, shared by every worker."""
    return 0 if now is None else int(now * 1000)
