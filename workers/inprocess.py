"""Celery worker threads inside the calling process: the embedded default's worker pool."""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

from celery.platforms import EX_OK
from celery.worker import WorkController, state

from workers.app import app


class _Controller(WorkController):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.ready = threading.Event()
        super().__init__(*args, **kwargs)

    def on_consumer_ready(self, consumer: Any) -> None:
        self.ready.set()


class InProcessWorker:
    """A thread-pool Celery worker consuming the given queues, started and stopped with this process."""

    def __init__(self, queues: list[str], concurrency: int) -> None:
        self.queues = queues
        self.concurrency = concurrency
        self._controller: _Controller | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 30) -> None:
        app.finalize()
        state.should_stop = None  # a worker stopped before in this process set it
        self._controller = _Controller(
            app=app,
            pool="threads",
            concurrency=self.concurrency,
            queues=self.queues,
            hostname=f"embedded-{os.getpid()}@{socket.gethostname()}",
            loglevel="WARNING",
            without_heartbeat=True,
            without_mingle=True,
            without_gossip=True,
        )
        self._thread = threading.Thread(target=self._controller.start, name="celery-worker", daemon=True)
        self._thread.start()
        if not self._controller.ready.wait(timeout):
            raise RuntimeError("the in-process worker did not start")

    def stop(self) -> None:
        if self._controller is not None:
            # Also ends a consumer that is reconnecting to a broker gone away: its retry loop asks this flag.
            state.should_stop = EX_OK
            self._controller.stop(in_sighandler=False)
        if self._thread is not None:
            self._thread.join(15)
        self._controller = self._thread = None
