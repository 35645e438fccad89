"""What one process needs to run steps: the configuration, the run store, breakers and the session pool."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from celery.signals import worker_shutdown
from redis import Redis

import celeryconfig
from orchestrator.breaker import CircuitBreaker
from orchestrator.config import Config, load_config
from orchestrator.errors import ConfigError
from orchestrator.flusher import start_flusher
from orchestrator.registry import Registry
from orchestrator.runs import RunStore
from workers.app import app
from workers.sessions import SessionPool


@dataclass
class Runtime:
    config: Config
    store: RunStore
    pool: SessionPool
    _breakers: dict[tuple[str, str], CircuitBreaker] = field(default_factory=dict)
    _listener: Any = None
    _flusher: Any = None

    @classmethod
    def create(cls, config: Config, redis_url: str) -> Runtime:
        settings = celeryconfig.settings
        store = RunStore(Redis.from_url(redis_url), settings.namespace, settings.run_ttl)
        runtime = cls(config=config, store=store, pool=SessionPool(config, settings.home / "logs"))
        runtime._listen_for_cancels()
        runtime._flusher = start_flusher(store)
        return runtime

    def breaker(self, service: str, instance: str) -> CircuitBreaker:
        """The shared breaker of one service instance."""
        key = (service, instance)
        if key not in self._breakers:
            settings = self.config.services[service].breaker
            self._breakers[key] = CircuitBreaker.of(self.store.redis, self.store.namespace, service, instance, settings)
        return self._breakers[key]

    def discover(self, service: str) -> list[str]:
        """Ask the service's server for its tools (not the client's cache) and record them; their names."""
        instance = self.config.services[service].server
        listing = self.pool.run(self.pool.list_tools(instance))
        tools = [{"name": t.name, "description": t.description, "input_schema": t.input_schema} for t in listing.tools]
        Registry(self.store.redis, self.store.namespace).save(service, instance, tools)
        return [t.name for t in listing.tools]

    def _listen_for_cancels(self) -> None:
        # A cancelled run's in-flight calls are cancelled in every worker, told over pub/sub.
        pubsub = self.store.redis.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        pubsub.subscribe(**{self.store.cancel_channel: lambda message: self.pool.cancel(message["data"].decode())})
        self._listener = pubsub.run_in_thread(sleep_time=0.2, daemon=True)

    def close(self) -> None:
        if self._listener is not None:
            self._listener.stop()
        if self._flusher is not None:
            self._flusher.stop()
        self.pool.close()
        self.store.redis.close()


_current: Runtime | None = None
_lock = threading.Lock()


@worker_shutdown.connect  # type: ignore[untyped-decorator]
def _close_on_shutdown(**_: Any) -> None:
    # A worker's warm shutdown has let in-flight calls finish: close the MCP sessions (stopping stdio
    # servers) before the process exits.
    if _current is not None:
        _current.close()


def install(runtime: Runtime | None) -> None:
    """Make runtime the one this process's tasks use (the embedded default does this)."""
    global _current
    with _lock:
        _current = runtime


def current() -> Runtime:
    """This process's runtime; a worker process builds it from MCPO_CONFIG on first use."""
    global _current
    with _lock:
        if _current is None:
            path = celeryconfig.settings.config
            if path is None:
                raise ConfigError("this worker has no configuration: start it with --config FILE or set MCPO_CONFIG")
            _current = Runtime.create(load_config(path), str(app.conf.result_backend))
        return _current
