"""Fast reclaim of a dead worker's messages: workers heartbeat, and live ones put a dead one's messages back.

kombu's Redis transport keeps every message a worker reserved (prefetched, waiting for an ETA, or running) in
the `unacked` hash, keyed by delivery tag, until the worker acks it; only a sweep after the visibility timeout
(3600 s by default) would otherwise hand a dead worker's messages to another. Here each worker notes the tags
it receives in a set of its own and beats every `MCPO_HEARTBEAT_INTERVAL` seconds; a worker that misses three
beats is dead, and whichever live worker sees it first restores its messages to their queues. Each transition
(a beat, a reclaim) is one Lua script on the broker's Redis, timed by Redis's clock: two reapers racing restore
each message once (the `HDEL` of the unacked entry decides), and a worker that beats again is left alone.
A tag is noted in the transaction that keeps the message as unacked (workers/transport.py), so no message is
unacked without its worker known. The visibility timeout stays the backstop for what kombu itself drops: a
worker killed between popping a message off its queue and keeping it as unacked.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from typing import Any

from celery.signals import worker_init, worker_shutdown
from kombu.utils.json import dumps, loads
from redis import Redis

from orchestrator.batching import serving_key
from orchestrator.settings import settings
from orchestrator.text import as_text

logger = logging.getLogger(__name__)

MISSED_BEATS = 3  # a worker is dead once this many beats are overdue

# KEYS: workers zset, this worker's tags set, unacked hash, then the serving zset of each queue it consumes.
# ARGV: worker id, lifetime ms, tags set ttl ms.
# Returns 1 when the worker was not registered (its first beat, or peers declared it dead meanwhile).
_BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local new = redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
for i = 4, #KEYS do
  redis.call('ZADD', KEYS[i], now + tonumber(ARGV[2]), ARGV[1])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - 3600000)
end
for _, tag in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if redis.call('HEXISTS', KEYS[3], tag) == 0 then redis.call('SREM', KEYS[2], tag) end
end
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return new
"""

# KEYS: workers zset. Returns the workers whose deadline has passed.
_DEAD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now)
"""

# KEYS: workers zset, the dead worker's tags set, unacked hash, unacked index, then the queue lists.
# ARGV: worker id, then (tag, index of its queue in KEYS, payload) triples (a tag repeats per queue).
# Returns the messages restored, or -1 when the worker is alive again or another reaper took it.
_RECLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local deadline = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not deadline or tonumber(deadline) >= now then return -1 end
local won = {}
local restored = 0
for i = 2, #ARGV, 3 do
  local tag = ARGV[i]
  if won[tag] == nil then
    won[tag] = redis.call('HDEL', KEYS[3], tag) == 1
    if won[tag] then
      redis.call('ZREM', KEYS[4], tag)
      restored = restored + 1
    end
    redis.call('SREM', KEYS[2], tag)
  end
  if won[tag] then redis.call('RPUSH', KEYS[tonumber(ARGV[i + 1])], ARGV[i + 2]) end
end
redis.call('ZREM', KEYS[1], ARGV[1])
return restored
"""


class Reclaimer:
    """This worker's heartbeat, and the reaper of dead peers' messages, on the broker's Redis."""

    def __init__(self, channel: Any, namespace: str, interval: float, visibility_timeout: int,
                 queues: list[str]) -> None:  # fmt: skip
        self.channel = channel  # a kombu Redis channel of its own: queue lookup, priorities, key names
        self.redis = Redis(connection_pool=channel.pool)  # unprefixed: keys are prefixed here, once
        self.prefix: str = channel.global_keyprefix or ""
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.interval = interval
        self.visibility_timeout = visibility_timeout
        self.workers_key = f"{self.prefix}{namespace}:workers"
        self.serving = [serving_key(namespace, queue) for queue in queues]  # counted as batches are planned
        self._tags_prefix = f"{self.prefix}{namespace}:worker:"
        self.unacked = self.prefix + channel.unacked_key
        self.unacked_index = self.prefix + channel.unacked_index_key
        self._beat = self.redis.register_script(_BEAT)
        self._dead = self.redis.register_script(_DEAD)
        self._reclaim = self.redis.register_script(_RECLAIM)
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._beats = 0

    def tags_key(self, worker: str) -> str:
        return f"{self._tags_prefix}{worker}:tags"

    def note(self, pipe: Any, delivery_tag: str) -> None:
        """Remember, in pipe (kombu's, which adds the key prefix itself), that this worker holds the message."""
        pipe.sadd(self.tags_key(self.id).removeprefix(self.prefix), delivery_tag)

    def beat(self) -> None:
        lifetime_ms = int(self.interval * MISSED_BEATS * 1000)
        keys = [self.workers_key, self.tags_key(self.id), self.unacked, *self.serving]
        new = self._beat(keys=keys, args=[self.id, lifetime_ms, self.visibility_timeout * 1000])
        if new and self._beats:
            logger.warning("worker %s missed %d heartbeats: peers have put its calls back on their queues; "
                           "calls it still runs may be made twice", self.id, MISSED_BEATS)  # fmt: skip
        self._beats += 1

    def reap(self) -> int:
        """Put every dead worker's messages back on their queues; the number restored."""
        restored = 0
        for raw in self._dead(keys=[self.workers_key]):
            worker = as_text(raw)
            count = self.reclaim(worker)
            if count >= 0:
                logger.warning("worker %s stopped beating: %d of its messages put back on their queues", worker, count)
                restored += count
        return restored

    def reclaim(self, worker: str) -> int:
        """One dead worker's messages back on their queues, atomically; -1 if it is alive or already reaped."""
        tags_key = self.tags_key(worker)
        tags = [tag.decode() for tag in self.redis.smembers(tags_key)]  # type: ignore[union-attr]
        entries = self.redis.hmget(self.unacked, tags) if tags else []
        queues: list[str] = []
        args: list[Any] = [worker]
        for tag, entry in zip(tags, entries, strict=True):
            if entry is None:  # acked meanwhile
                continue
            for queue, payload in self._destinations(entry):
                if queue not in queues:
                    queues.append(queue)
                args += [tag, 5 + queues.index(queue), payload]
        keys = [self.workers_key, tags_key, self.unacked, self.unacked_index, *queues]
        return int(self._reclaim(keys=keys, args=args))

    def _destinations(self, entry: bytes | str) -> list[tuple[str, str]]:
        # What kombu's own restore does (Channel._do_restore_message): marked redelivered, pushed to every
        # queue the exchange routes it to, at its priority's list.
        payload, exchange, routing_key = loads(entry)  # type: ignore[no-untyped-call]
        try:
            payload["headers"]["redelivered"] = True
            payload["properties"]["delivery_info"]["redelivered"] = True
        except (KeyError, TypeError):
            pass
        priority = self.channel._get_message_priority(payload, reverse=False)
        body = dumps(payload)  # type: ignore[no-untyped-call]
        return [(self.prefix + self.channel._q_for_pri(queue, priority), body)
                for queue in self.channel._lookup(exchange, routing_key)]  # fmt: skip

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mcpo-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                self.beat()
                self.reap()
            except Exception:  # boundary: Redis away or a bad entry; the next beat tries again
                logger.warning("heartbeat failed; retrying in %.1f s", self.interval, exc_info=True)
            self._stopped.wait(self.interval)

    def stop(self) -> None:
        """Stop beating and leave the fleet: a worker that shut down cleanly restored its own messages."""
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(self.interval + 5)
        try:
            self.redis.zrem(self.workers_key, self.id)
            for key in self.serving:
                self.redis.zrem(key, self.id)
            self.redis.delete(self.tags_key(self.id))
        except Exception:  # boundary: Redis away at shutdown; the entry expires as a dead worker's would
            logger.warning("could not deregister worker %s", self.id, exc_info=True)


_current: Reclaimer | None = None


def _start(sender: Any, **_: Any) -> None:
    # Registered before the consumer starts, so every message this worker reserves is noted.
    global _current
    try:
        channel = sender.app.connection_for_write().default_channel
    except Exception:  # boundary: the broker is away at start; Celery will wait for it, the backstop holds
        logger.warning("no heartbeat: the broker was unreachable at start", exc_info=True)
        return
    if not hasattr(channel, "unacked_key"):
        logger.info("broker is not Redis: dead workers' calls return after the visibility timeout only")
        return
    queues = list(sender.app.amqp.queues.consume_from or {})
    _current = Reclaimer(channel, settings.namespace, settings.heartbeat_interval, settings.visibility_timeout, queues)
    _current.start()


def heartbeat() -> tuple[str, str] | None:
    """This worker's id and the key of the sorted set its beats are kept in; None when it does not beat."""
    return (_current.id, _current.workers_key) if _current is not None else None


def note(pipe: Any, delivery_tag: str) -> None:
    """Note in pipe that this worker holds the message, when it beats."""
    if _current is not None:
        _current.note(pipe, delivery_tag)


def _stop(**_: Any) -> None:
    global _current
    if _current is not None:
        _current.stop()
        _current = None


def wire() -> None:
    """Heartbeat in every worker of this process (Celery signals: start, shutdown)."""
    worker_init.connect(_start, weak=False)
    worker_shutdown.connect(_stop, weak=False)
