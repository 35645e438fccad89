"""The flusher: drains the records buffer in Redis into SQL, in batches, off every step's path.

One flusher at a time holds a lock in Redis, reads a batch from the head of the buffer, writes it in one
transaction and only then trims it off the buffer, if it still holds the lock. A crash or a database
outage therefore loses nothing: the events stay in Redis and the next flush (here or in any other process)
writes them; a batch written but not trimmed is recognized by its event ids and not audited twice. An event the
database refuses for what it holds (a value too long for its column, a broken constraint) would be refused at
every retry and hold up every later event: the batch is halved until the refused events stand alone, they go to
the dead letters (kind `record`, orchestrator/deadletters.py) and the rest is written.

Every API process runs one in a background thread, and every worker runtime one as a backstop that writes
only events that have waited `WORKER_BACKSTOP` seconds; each drains what is left when it closes.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

from redis import Redis
from redis.exceptions import RedisError
from sqlalchemy.exc import DataError, IntegrityError

from orchestrator.deadletters import DeadLetter, DeadLetters
from orchestrator.errors import RecordsError
from orchestrator.history.events import buffer_key, recorded_at
from orchestrator.history.records import RecordStore, describe
from orchestrator.runs import RunStore
from orchestrator.settings import settings

log = logging.getLogger(__name__)
WORKER_BACKSTOP = 2.0  # seconds: four flush intervals; while an enqueuing process flushes, no event gets that old

# Trims a written batch, unless the lock expired meanwhile (another flusher may be writing it again).
_TRIM = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('LTRIM', KEYS[1], tonumber(ARGV[2]), -1)
redis.call('DEL', KEYS[2])
return 1
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Flusher:
    """Moves record events from the Redis buffer into a RecordStore."""

    def __init__(self, redis: Redis, namespace: str, store: RecordStore, batch: int = 500,
                 interval: float = 0.5, lock_ttl: float = 120, backstop: float = 0.0) -> None:  # fmt: skip
        """`backstop`: the thread writes only once the oldest event has waited that many seconds, leaving the
        buffer to flushers without one while any runs (a worker's: see `start_flusher`)."""
        self.redis = redis
        self.backstop = backstop
        self.store = store
        self.buffer = buffer_key(namespace)
        self.lock = f"{self.buffer}:lock"
        self.batch = batch
        self.interval = interval
        self.lock_ttl = lock_ttl
        self.dead_letters = DeadLetters(redis, namespace)
        self._trim = redis.register_script(_TRIM)
        self._release = redis.register_script(_RELEASE)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def pending(self) -> int:
        """Events waiting in the buffer."""
        return int(self.redis.llen(self.buffer))

    def flush_once(self, min_age: float = 0.0) -> int:
        """Write one batch, if the buffer's oldest event has waited `min_age` seconds and no other flusher is at
        it; how many events."""
        oldest = self.redis.lindex(self.buffer, 0)
        if oldest is None or time.time() - recorded_at(oldest) < min_age:
            return 0
        token = uuid.uuid4().hex
        if not self.redis.set(self.lock, token, nx=True, px=int(self.lock_ttl * 1000)):
            return 0
        try:
            batch = self.redis.lrange(self.buffer, 0, self.batch - 1)
            refused = self._apply(batch) if batch else []
            for raw, reason in refused:
                self.dead_letters.add(DeadLetter("record", reason, self.buffer, _bytes(raw)))
                log.error("records: the database refused an event (%s); moved to %s", reason, self.dead_letters.key)
            if not self._trim(keys=[self.buffer, self.lock], args=[token, len(batch)]):
                log.warning("records: flush of %d events outlived its lock; the next flush dedups them", len(batch))
            return len(batch)
        finally:
            self._release(keys=[self.lock], args=[token])

    def _apply(self, batch: list[bytes | str]) -> list[tuple[bytes | str, str]]:
        """Write batch; the events the database refuses (not an outage: see `refused`), with the reason, found by
        halving the batch until each refused event stands alone, while the others are written."""
        try:
            self.store.apply(batch)
            return []
        except Exception as exc:
            if not refused(exc):
                raise
            if len(batch) == 1:
                return [(batch[0], _reason(exc))]
        half = len(batch) // 2
        return self._apply(batch[:half]) + self._apply(batch[half:])

    def flush(self, timeout: float = 30) -> int:
        """Drain the buffer (waiting for other flushers); raises RecordsError if the database fails."""
        written, deadline = 0, time.monotonic() + timeout
        while self.pending():
            count = self.flush_once()
            written += count
            if count == 0:
                if time.monotonic() > deadline:
                    raise RecordsError(f"records buffer {self.buffer} not drained within {timeout:g} s")
                time.sleep(0.05)  # another process holds the lock and is writing
        return written

    def start(self) -> Flusher:
        self._thread = threading.Thread(target=self._run, name="records-flusher", daemon=True)
        self._thread.start()
        return self

    def stop(self, drain: float = 5) -> None:
        """Stop the thread and write what is left, for up to `drain` seconds; the rest stays in Redis."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None
        try:
            self.flush(drain)
        except (RecordsError, RedisError) as exc:
            log.warning("records: %s; the events stay in Redis for the next flush", exc)

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                count = self.flush_once(self.backstop)
            except Exception as exc:  # boundary: the thread lives on; the events wait in Redis
                failures += 1
                if failures == 1 or failures % 30 == 0:  # an outage is logged once, then now and then
                    log.warning("records: flush to %s failed (%s); events wait in Redis", describe(self.store.url), exc)
                self._stop.wait(min(10.0, self.interval * 2**failures))
                continue
            if failures:
                log.info("records: flush to %s works again after %d failures", describe(self.store.url), failures)
                failures = 0
            if count < self.batch:
                self._stop.wait(self.interval)


def refused(exc: BaseException) -> bool:
    """Whether the database refused what an event holds (a value too long, a broken constraint, an event that is
    not one), rather than being out of reach: a refused event would be refused again at every retry."""
    cause = exc.__cause__ if isinstance(exc, RecordsError) else exc
    return isinstance(cause, IntegrityError | DataError | ValueError | KeyError | TypeError | AttributeError)


def _reason(exc: BaseException) -> str:
    cause = exc.__cause__ if isinstance(exc, RecordsError) and exc.__cause__ is not None else exc
    return f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"[:1000]


def _bytes(raw: bytes | str) -> bytes:
    return raw if isinstance(raw, bytes) else raw.encode()


def start_flusher(store: RunStore, backstop: float = 0.0) -> Flusher | None:
    """A flusher for this process's run store, writing to the configured records database; None with
    records off (MCPO_RECORDS=off). A worker's flusher is a backstop: a worker's threads share one GIL with
    its calls, so the writing is left to the processes that enqueue while any of them flushes."""
    if not store.record:
        return None
    records = RecordStore(settings.records_url)
    return Flusher(store.redis, store.namespace, records, backstop=backstop).start()
