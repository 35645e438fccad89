"""Health of service instances: what the beats saw last, their history, and instances to avoid for a while.

Keys (under the namespace): `health:<service>` a hash of instance → the latest Health JSON;
`health:<service>:<instance>:history` the last HISTORY beats, newest first (every beat also goes to the
SQL records, table `health`, when records are on); `avoid:<service>` a hash of
instance → until when calls should go elsewhere (an instance that just failed a call). Every change is
announced on the `fleet` channel, so workers drop their cached view at once.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel
from redis import Redis

from orchestrator.history import events
from orchestrator.settings import settings

HISTORY = 100

HealthStatus = Literal["up", "down"]


class Health(BaseModel):
    """One health check of one instance."""

    status: HealthStatus
    at: float
    latency_ms: float | None = None
    last_seen: float | None = None  # the last beat that found it up
    tools: int | None = None
    error: str | None = None


class HealthBook:
    """Health records of every instance, in Redis; each beat also goes to the SQL records' history."""

    def __init__(self, redis: Redis, namespace: str, record: bool | None = None) -> None:
        self.redis = redis
        self.namespace = namespace
        self.record_beats = settings.records if record is None else record

    @property
    def channel(self) -> str:
        return f"{self.namespace}:fleet"

    def _latest_key(self, service: str) -> str:
        return f"{self.namespace}:health:{service}"

    def _history_key(self, service: str, instance: str) -> str:
        return f"{self.namespace}:health:{service}:{instance}:history"

    def _avoid_key(self, service: str) -> str:
        return f"{self.namespace}:avoid:{service}"

    def record(self, service: str, instance: str, health: Health) -> None:
        """Keep a beat's outcome as the latest and in the history; a passing beat ends any avoidance."""
        raw = health.model_dump_json(exclude_none=True)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(self._latest_key(service), instance, raw)
        pipe.lpush(self._history_key(service, instance), raw)
        pipe.ltrim(self._history_key(service, instance), 0, HISTORY - 1)
        if health.status == "up":
            pipe.hdel(self._avoid_key(service), instance)
        if self.record_beats:
            beat = health.model_dump(include={"status", "latency_ms", "tools", "error"})
            event = events.event("health", service=service, instance=instance, beat_at=health.at, **beat)
            pipe.rpush(events.buffer_key(self.namespace), event)
        pipe.publish(self.channel, service)
        pipe.execute()

    def avoid(self, service: str, instance: str, seconds: float) -> None:
        """Send calls to other instances for a while: this one just failed a call."""
        if seconds <= 0:
            return
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(self._avoid_key(service), instance, repr(time.time() + seconds))
        pipe.publish(self.channel, service)
        pipe.execute()

    def view(self, service: str) -> tuple[dict[str, Health], dict[str, float]]:
        """The latest health of each instance, and the instances to avoid with until when (one round trip)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self._latest_key(service))
        pipe.hgetall(self._avoid_key(service))
        latest, avoid = pipe.execute()
        now = time.time()
        healths = {k.decode(): Health.model_validate_json(v) for k, v in latest.items()}
        return healths, {k.decode(): until for k, v in avoid.items() if (until := float(v)) > now}

    def history(self, service: str, instance: str, count: int = HISTORY) -> list[Health]:
        """The last beats of an instance, newest first."""
        raw = self.redis.lrange(self._history_key(service, instance), 0, count - 1)
        return [Health.model_validate_json(item) for item in raw]

    def forget(self, service: str, instance: str) -> None:
        """Drop an instance's records (it was deregistered)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hdel(self._latest_key(service), instance)
        pipe.delete(self._history_key(service, instance))
        pipe.hdel(self._avoid_key(service), instance)
        pipe.publish(self.channel, service)
        pipe.execute()
