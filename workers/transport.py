"""kombu's Redis transport with one client per channel for its synchronous commands.

kombu builds a new `redis.Redis` for every message it reserves and every ack (`conn_or_acquire`), and
redis-py 8's constructor is costly: about a tenth of a busy worker's CPU went to it (py-spy). A client
over the channel's connection pool is safe to share between threads, so one serves them all; it is
rebuilt if the channel replaces its pool (after a reconnect).
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis


class Channel(redis.Channel):
    _sync_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)  # type: ignore[no-untyped-call]
        client = self._sync_client
        if client is None or client.connection_pool is not self.pool:
            client = self._sync_client = super()._create_client()  # type: ignore[no-untyped-call]
        return client


class Transport(redis.Transport):
    Channel = Channel


def transport_for(broker_url: str) -> str | None:
    """The kombu transport for a broker URL: this one for plain Redis, kombu's choice otherwise."""
    return f"{__name__}:Transport" if broker_url.startswith("redis://") else None
