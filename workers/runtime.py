"""What one process needs to run steps: the configuration, the run store and the session pool."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from redis import Redis

import celeryconfig
from orchestrator.config import Config, load_config
from orchestrator.errors import ConfigError
from orchestrator.runs import RunStore
from workers.app import app
from workers.sessions import SessionPool


@dataclass
class Runtime:
    config: Config
    store: RunStore
    pool: SessionPool

    @classmethod
    def create(cls, config: Config, redis_url: str) -> Runtime:
        settings = celeryconfig.settings
        store = RunStore(Redis.from_url(redis_url), settings.namespace, settings.run_ttl)
        return cls(config=config, store=store, pool=SessionPool(config, settings.home / "logs"))

    def close(self) -> None:
        self.pool.close()
        self.store.redis.close()


_current: Runtime | None = None
_lock = threading.Lock()


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
