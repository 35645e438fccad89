"""kombu's Redis transport with one client per channel for its synchronous commands, and a channel that outlives
a Redis restart.

kombu builds a new `redis.Redis` for every message it reserves and every ack (`conn_or_acquire`), and
redis-py 8's constructor is costly: about a tenth of a busy worker's CPU went to it (py-spy). A client
over the channel's connection pool is safe to share between threads, so one serves them all; it is
rebuilt if the channel replaces its pool (after a reconnect).

When the broker connection drops, Celery closes the channel and opens another; stock kombu then forgets the
channel's pool and cannot build one again (its connection is gone), so restoring the unacknowledged messages
on close died with `AttributeError: 'NoneType' object has no attribute 'hostname'` and took the worker with
it. Here a closed channel keeps its last pool: the restore runs, and the calls still running ack on it when
they end. The restore leaves those running calls alone (requeued, they would run twice) and requeues the
rest (reserved, or waiting out a retry countdown), which Celery drops on a connection loss. The channel's
synchronous commands (acks, publishes, the restore) wait out an outage of up to MCPO_REDIS_OUTAGE seconds.
"""

from __future__ import annotations

import time
from typing import Any

from kombu.transport import redis, virtual
from kombu.utils.json import dumps

from workers import reclaim
from workers.outage import outage_retry
from workers.sentinel import is_sentinel


def _running_tags() -> set[str]:
    """The delivery tags of the calls this worker process is running now."""
    from celery.worker.state import active_requests  # the worker's own state; empty outside a worker

    return {request.message.delivery_tag for request in list(active_requests)}


class QoS(redis.QoS):
    def append(self, message: Any, delivery_tag: str) -> None:
        # kombu's own, with the tag noted for this worker's reclaim in the same transaction: killed between the
        # two, the worker would leave a message that only the visibility timeout hands back.
        delivery = message.delivery_info
        entry = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])  # type: ignore[no-untyped-call]
        with self.pipe_or_acquire() as pipe:
            pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()}).hset(self.unacked_key, delivery_tag, entry)
            reclaim.note(pipe, delivery_tag)
            pipe.execute()
        virtual.QoS.append(self, message, delivery_tag)  # type: ignore[no-untyped-call]

    def restore_unacked(self, client: Any = None) -> None:
        running = _running_tags()
        with self.channel.conn_or_acquire(client) as client:
            for tag in self._delivered:
                if tag not in running:
                    self.restore_by_tag(tag, client=client)  # type: ignore[no-untyped-call]
        self._delivered.clear()


class Channel(redis.Channel):
    QoS = QoS
    _sync_client: Any = None
    _last_pool: Any = None

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        params: dict[str, Any] = super()._connparams(asynchronous)  # type: ignore[no-untyped-call]
        if not asynchronous:  # the event loop's connections must not block: they reconnect through Celery
            params["retry"] = outage_retry()
        return params

    def _disconnect_pools(self) -> None:
        self._last_pool = self._pool if self._pool is not None else self._last_pool
        super()._disconnect_pools()  # type: ignore[no-untyped-call]

    def _sync_pool(self) -> Any:
        # A closed channel cannot build a pool: it reuses its last one, which reconnects on demand.
        if self._pool is None and self._last_pool is not None:
            return self._last_pool
        return self.pool

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)  # type: ignore[no-untyped-call]
        pool = self._sync_pool()
        client = self._sync_client
        if client is None or client.connection_pool is not pool:
            options: dict[str, Any] = {"connection_pool": pool}
            provider = pool.connection_kwargs.get("credential_provider")
            if provider is not None:
                options["credential_provider"] = provider
            client = self._sync_client = self.Client(**options)
        return client


class Transport(redis.Transport):
    Channel = Channel


class SentinelChannel(Channel, redis.SentinelChannel):
    """kombu's Sentinel channel (its pool follows the group's master) with this module's channel behaviour."""


class SentinelTransport(redis.SentinelTransport):
    Channel = SentinelChannel


def transport_for(broker_url: str) -> str | None:
    """The kombu transport for a broker URL: these for plain Redis and a Sentinel group, kombu's choice otherwise."""
    if broker_url.startswith("redis://"):
        return f"{__name__}:Transport"
    if is_sentinel(broker_url):
        return f"{__name__}:SentinelTransport"
    return None
