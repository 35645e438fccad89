"""What one process needs to run steps: the configuration, the run store, breakers and the session pool."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from celery.signals import worker_ready, worker_shutdown

from orchestrator.config import Config, load_config
from orchestrator.errors import ConfigError
from orchestrator.health import Health
from orchestrator.history.flusher import WORKER_BACKSTOP, start_flusher
from orchestrator.registry import Registry, definition
from orchestrator.runs import RunStore
from orchestrator.security import redaction
from orchestrator.security.access import alert_settings
from orchestrator.security.alerts import unwatch, watch
from orchestrator.security.events import Listener
from orchestrator.security.vault import Vault
from orchestrator.settings import settings
from workers.app import redis_url
from workers.balancer import Balancer
from workers.credentials import Credentials
from workers.guard import CallGuard
from workers.outage import outage_retry
from workers.pipeline import Pipeline
from workers.policies import in_order
from workers.sessions import SessionPool, describe
from workers.tls import connect_redis

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    config: Config
    store: RunStore
    pool: SessionPool
    balancer: Balancer
    _listener: Any = None
    _flusher: Any = None
    guard: CallGuard | None = None  # access control on: checks each step's caller token before its MCP call
    pipeline: Pipeline = field(default_factory=lambda: Pipeline([]))  # every per-call policy, in order
    _watching: list[Listener] = field(default_factory=list)
    _closed: bool = False
    _threads: ThreadPoolExecutor | None = None

    @property
    def threads(self) -> ThreadPoolExecutor:
        """The threads the calls of batch messages run on, shared by every batch: the worker's concurrency of them."""
        with _lock:
            if self._threads is None:
                self._threads = ThreadPoolExecutor(settings.worker_concurrency, thread_name_prefix="mcpo-batch")
            return self._threads

    @classmethod
    def create(cls, config: Config, redis_url: str) -> Runtime:
        # Each of the worker's threads may hold a connection at once: Celery's pool (calls alone) and the batches'
        # (`threads` below), and the listener, flusher and heartbeat beside them.
        connections = 2 * settings.worker_concurrency + 16
        redis = connect_redis(redis_url, retry=outage_retry(), max_connections=connections)
        store = RunStore(redis, settings.namespace, settings.run_ttl)
        balancer = Balancer(config, store.redis, store.namespace)
        credentials = Credentials(Vault(store.redis, settings.namespace))
        runtime = cls(config, store, SessionPool(balancer.server, settings.home / "logs", credentials), balancer)
        runtime.guard = CallGuard.of(config, store.redis, settings.namespace)
        runtime.pipeline = Pipeline(in_order(store, balancer, runtime.guard, config, credentials))
        redaction.install()  # an in-process worker logs through its host's handlers
        runtime._listen()
        runtime._flusher = start_flusher(store, WORKER_BACKSTOP)
        runtime._watching = watch(store.redis, store.namespace, alert_settings(config.access))
        return runtime

    def check(self, service: str) -> dict[str, Health]:
        """A health beat: ask every instance of the service for its tools (not the client's cache), all at
        once; record health, latency and tools, and feed each instance's breaker."""
        self.balancer.invalidate(service)
        view = self.balancer.view(service)
        instances = list(view.servers)
        timeout = self.config.services[service].health.timeout
        checks = self.pool.run(_gather(*(self._check_one(name, timeout) for name in instances)))
        registry = Registry(self.store.redis, self.store.namespace)
        for name, (health, tools) in zip(instances, checks, strict=True):
            if health.status == "down" and name in view.health:
                health.last_seen = view.health[name].last_seen
            self.balancer.health.record(service, name, health)
            if tools is not None:
                registry.save(service, name, tools)
            breaker = self.balancer.breaker(service, name)
            if breaker.settings.enabled:
                breaker.beat(health.status == "up")
        return {name: health for name, (health, _) in zip(instances, checks, strict=True)}

    async def _check_one(self, instance: str, timeout: float) -> tuple[Health, list[dict[str, Any]] | None]:
        began = time.monotonic()
        try:
            listing = await self.pool.list_tools(instance, timeout)
        except Exception as exc:  # boundary: any failure to answer is the beat's verdict, not an error
            return Health(status="down", at=time.time(), error=describe(exc)), None
        latency = round((time.monotonic() - began) * 1000, 3)
        tools = [definition(tool) for tool in listing.tools]
        now = time.time()
        return Health(status="up", at=now, latency_ms=latency, last_seen=now, tools=len(tools)), tools

    def _listen(self) -> None:
        # Told over pub/sub: a cancelled run's in-flight calls are cancelled in every worker; a change to
        # a service's instances or health reaches every worker's balancer at once.
        pubsub = self.store.redis.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        pubsub.subscribe(**{
            self.store.cancel_channel: lambda message: self.pool.cancel(message["data"].decode()),
            self.balancer.health.channel: lambda message: self.balancer.invalidate(message["data"].decode()),
        })  # fmt: skip
        self._listener = pubsub.run_in_thread(sleep_time=0.2, daemon=True)

    def close(self) -> None:
        if self._closed:  # the worker's shutdown signal and its host may both close it
            return
        self._closed = True
        if self._listener is not None:
            self._listener.stop()
            # Joined before the pool below is closed: the listener's connection is the pool's, and closing it
            # under a get_message in progress fails that thread.
            self._listener.join(timeout=2)
        if self._flusher is not None:
            self._flusher.stop()
        unwatch(self._watching)
        if self._threads is not None:
            self._threads.shutdown(wait=True)
        self.pool.close()
        self.store.redis.close()


async def _gather(*checks: Any) -> list[Any]:
    return list(await asyncio.gather(*checks))


_current: Runtime | None = None
_lock = threading.Lock()


@worker_shutdown.connect  # type: ignore[untyped-decorator]
def _close_on_shutdown(**_: Any) -> None:
    # A worker's warm shutdown has let in-flight calls finish: close the MCP sessions (stopping stdio
    # servers) before the process exits.
    if _current is not None:
        _current.close()


@worker_ready.connect  # type: ignore[untyped-decorator]
def _start_on_ready(**_: Any) -> None:
    # Built now, not at the first task: a worker alone (no enqueuing process alive) must still write the events
    # waiting in Redis, and report refused messages on the audit chain, before any task reaches it.
    if _current is None and settings.config is not None:
        try:
            current()
        except Exception:  # boundary: the first task will say what is wrong, as before
            log.exception("worker: the runtime could not start at worker_ready; retried at the first task")


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
            path = settings.config
            if path is None:
                raise ConfigError("this worker has no configuration: start it with --config FILE or set MCPO_CONFIG")
            _current = Runtime.create(load_config(path), redis_url())
        return _current
