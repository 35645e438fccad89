"""The response cache: answers of read-only tool calls kept fleet-wide in Redis, served without calling the server.

An entry is keyed by service, tool and a digest of everything that decides the answer (the worker's policy,
workers/policies/cache.py, builds it: the servers' configuration, the tool's definition, the arguments, the
credentials the call is made with). Each service's entries are bounded by `max_bytes` (least recently used go
first) and each by its own TTL; an answer larger than a tenth of `max_bytes` is not kept. Errors are never kept.

Single-flight: the first worker to miss an entry takes a flight lock for it (as long as its call may take); the
others that miss the same entry wait for the answer instead of calling too, and call themselves when the lock goes
without an answer (the call failed: each then retries on its own).
"""

from __future__ import annotations

import json
import time
from typing import Any

from redis import Redis

# KEYS: the entry, the service's LRU index (a sorted set of entry -> last use), the sizes of its entries (a hash) and
# their total. ARGV: the value, its TTL (ms), the service's byte bound, now. Keeps the entry, then evicts the least
# recently used entries until the service fits its bound again (an entry that expired meanwhile counts until it is
# evicted, oldest first); returns how many it evicted.
PUT = """
local entry, index, sizes, total_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local value, ttl, bound, now = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local previous = redis.call('HGET', sizes, entry)
if previous then redis.call('INCRBY', total_key, -tonumber(previous)) end
redis.call('SET', entry, value, 'PX', ttl)
redis.call('ZADD', index, now, entry)
redis.call('HSET', sizes, entry, string.len(value))
local total, evicted = redis.call('INCRBY', total_key, string.len(value)), 0
while total > bound do
  local oldest = redis.call('ZRANGE', index, 0, 0)[1]
  if not oldest or oldest == entry then break end
  total = redis.call('INCRBY', total_key, -tonumber(redis.call('HGET', sizes, oldest) or 0))
  redis.call('DEL', oldest)
  redis.call('ZREM', index, oldest)
  redis.call('HDEL', sizes, oldest)
  evicted = evicted + 1
end
return evicted
"""

# KEYS: the entry, the service's LRU index, sizes and total. Drops the entry; 1 if it was there.
DROP = """
local size = redis.call('HGET', KEYS[3], KEYS[1])
if size then redis.call('INCRBY', KEYS[4], -tonumber(size)) end
redis.call('ZREM', KEYS[2], KEYS[1])
redis.call('HDEL', KEYS[3], KEYS[1])
return redis.call('DEL', KEYS[1])
"""


class ResponseCache:
    """One namespace's cached answers, as workers read and keep them and operators clear them."""

    def __init__(self, redis: Redis, namespace: str) -> None:
        self.redis = redis
        self.prefix = f"{namespace}:responses"
        self._put = redis.register_script(PUT)
        self._drop = redis.register_script(DROP)

    def key(self, service: str, tool: str, digest: str) -> str:
        return f"{self.prefix}:entry:{service}:{tool}:{digest}"

    def get(self, service: str, key: str) -> tuple[Any, float] | None:
        """The answer kept under key and its age in seconds, or None."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(key)
        pipe.zadd(self._keys(service)[0], {key: time.time()}, xx=True)  # recently used, if kept: evicted last
        raw = pipe.execute()[0]
        if raw is None:
            return None
        entry = json.loads(raw)
        return entry["output"], max(0.0, time.time() - float(entry["at"]))

    def put(self, service: str, key: str, output: Any, ttl: float, max_bytes: int) -> bool:
        """Keep an answer for ttl seconds within the service's bound; False when it is too large to keep."""
        value = json.dumps({"output": output, "at": time.time()}, separators=(",", ":"), default=str)
        if len(value) > max_bytes // 10:
            return False
        self._put(keys=[key, *self._keys(service)], args=[value, max(1, int(ttl * 1000)), max_bytes, time.time()])
        return True

    def lead(self, key: str, seconds: float, holder: str = "") -> bool:
        """Take the flight lock for key (for up to `seconds`), naming the worker that holds it: True for the one
        caller that should make the call."""
        return bool(self.redis.set(f"{key}:flight", holder or "-", nx=True, px=max(1, int(seconds * 1000))))

    def flying(self, key: str) -> bool:
        return bool(self.redis.exists(f"{key}:flight"))

    def leader_alive(self, key: str, heartbeats: str) -> bool:
        """Whether the call holding key's flight lock may still answer: its lock is there and, where workers beat in
        `heartbeats` (workers/reclaim.py), its worker still beats. A worker killed mid-call leaves its lock until
        the call's deadline: the calls waiting on it need not wait that long."""
        holder = self.redis.get(f"{key}:flight")
        if holder is None:
            return False
        if holder == b"-" or not self.redis.exists(heartbeats):
            return True  # nothing to tell by: the lock's own end will say
        beat = self.redis.zscore(heartbeats, holder)
        return beat is not None and beat >= time.time() * 1000

    def land(self, key: str) -> None:
        """Give the flight lock back: the call ended (its answer kept, or it failed)."""
        self.redis.delete(f"{key}:flight")

    def clear(self, service: str | None = None, tool: str | None = None) -> int:
        """Drop the kept answers of every service, one service, or one of its tools; how many were dropped."""
        dropped = 0
        for raw in self.redis.scan_iter(f"{self.prefix}:entry:{service or '*'}:{tool or '*'}:*", count=1000):
            key = raw.decode() if isinstance(raw, bytes) else raw
            if not key.endswith(":flight"):
                owner = key.removeprefix(f"{self.prefix}:entry:").split(":", 1)[0]
                dropped += int(self._drop(keys=[key, *self._keys(owner)]))
        return dropped

    def _keys(self, service: str) -> list[str]:
        """The service's LRU index, entry sizes and their total."""
        return [f"{self.prefix}:{part}:{service}" for part in ("lru", "sizes", "total")]
