"""Riding over a short Redis outage (a restart, a failover): commands wait for Redis to come back, up to a bound.

A Redis restarted with AOF on keeps the queues, the unacknowledged messages and the run state, so a worker that
waits for it loses nothing; one that fails its step instead would fail the run. The bound (MCPO_REDIS_OUTAGE,
60 s by default) is the longest outage a call waits out; past it the command's error is raised as before.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from redis.backoff import EqualJitterBackoff
from redis.retry import Retry

from orchestrator.settings import settings

T = TypeVar("T")

_given_up = threading.Event()


def give_up() -> None:
    """From now on, this process's Redis commands fail at once instead of waiting out an outage: Redis has been gone
    for the whole bound already, and what is left to do (closing) should not wait for it again."""
    _given_up.set()


class OutageRetry(Retry):
    """redis-py's Retry bounded by time rather than by a count: a failed command is retried, with a jittered backoff
    of at most `cap` seconds (a fleet's clients do not all come back at once), until it succeeds or `seconds` have
    passed since its first failure."""

    def __init__(self, seconds: float, cap: float = 1.0) -> None:
        super().__init__(EqualJitterBackoff(cap=cap, base=0.05), -1)
        self.seconds = seconds

    def gives_up(self, error: Exception) -> bool:
        """Whether error ends the wait at once: none does, unless the process gave up on Redis (`give_up`)."""
        return _given_up.is_set()

    def call_with_retry(self, do: Callable[[], T], fail: Callable[..., Any],
                        is_retryable: Callable[[Exception], bool] | None = None,
                        with_failure_count: bool = False) -> T:  # fmt: skip
        self._backoff.reset()  # type: ignore[no-untyped-call]
        failures = 0
        deadline: float | None = None
        while True:
            try:
                return do()
            except self._supported_errors as error:
                if self.gives_up(error) or (is_retryable and not is_retryable(error)):
                    raise
                failures += 1
                if with_failure_count:
                    fail(error, failures)
                else:
                    fail(error)
                now = time.monotonic()
                deadline = deadline if deadline is not None else now + self.seconds
                if now >= deadline:
                    raise error
                time.sleep(min(self._backoff.compute(failures), deadline - now))


def outage_retry() -> OutageRetry:
    """The retry policy for this process's Redis clients, bounded by MCPO_REDIS_OUTAGE."""
    return OutageRetry(settings.redis_outage)


def ride_out(read: Callable[[], T], seconds: float | None = None) -> T:
    """read(), retried while Redis is unreachable, for up to `seconds` (default MCPO_REDIS_OUTAGE) after the first
    failure: a process following a run sees it through a Redis restart."""
    from redis.exceptions import ConnectionError, TimeoutError

    retry = OutageRetry(seconds if seconds is not None else outage_retry().seconds)
    return retry.call_with_retry(read, lambda _: None, lambda error: isinstance(error, ConnectionError | TimeoutError))
