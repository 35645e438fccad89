"""Security alerts: repeated denials or forgeries, counted across the whole fleet, raise one alert per window.

Every process counts the denials it reports (permission-denied at the API, call-refused at a worker's guard,
message-refused at a worker's consumer) in a Redis sorted set per kind, so attempts spread over many workers
add up. When a kind's count within `window` seconds reaches `threshold`, the first process to see it takes a
marker that lives for the window (SET NX, fleet-wide) and raises the alert: one structured WARNING
`security alert` on the `mcpo.security` logger, a row on the audit chain (action `alert`), and, when
configured, a JSON POST to a webhook, sent from a daemon thread so the denial path never waits on it. A webhook
URL that carries a token (chat webhooks do) may be kept in the vault: `webhook: {secret: NAME}`.
"""

from __future__ import annotations

import atexit
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx2
from pydantic import BaseModel, ConfigDict, Field, field_validator
from redis import Redis
from redis.exceptions import RedisError

from orchestrator.errors import VaultError
from orchestrator.history.events import audit_security, record_operation
from orchestrator.security.events import Listener, off_security_event, on_security_event
from orchestrator.security.secretref import SecretRef
from orchestrator.security.vault import Vault
from orchestrator.settings import settings
from orchestrator.text import as_text

log = logging.getLogger("mcpo.security")

DENIALS = frozenset({"permission-denied", "call-refused", "message-refused"})
KEPT = 10_000  # members kept per kind: a flood must not grow the set without bound; the count saturates here
SUBJECTS = 100  # the most recent events whose subjects an alert names

# Counts one denial and says whether it raises the alert. Redis's own clock, so every host of the fleet shares
# one window; the marker makes the alert once per window fleet-wide. Returns {count, raised, members}.
_COUNT = """
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1000000
local window = tonumber(ARGV[2])
local ttl = math.ceil(window * 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(tonumber(ARGV[4]) + 1))
redis.call('PEXPIRE', KEYS[1], ttl)
local count = redis.call('ZCARD', KEYS[1])
if count < tonumber(ARGV[3]) or not redis.call('SET', KEYS[2], '1', 'NX', 'PX', ttl) then
  return {count, 0, {}}
end
return {count, 1, redis.call('ZRANGE', KEYS[1], -tonumber(ARGV[5]), -1)}
"""


class AlertSettings(BaseModel):
    """`access.alerts`: how many denials of one kind within `window` seconds raise an alert, and where to POST it."""

    model_config = ConfigDict(extra="forbid")
    threshold: int = Field(default=5, ge=1)
    window: float = Field(default=60.0, gt=0, le=86400)
    webhook: str | SecretRef | None = None  # http(s) URL that receives each alert as JSON, or a vault secret's
    timeout: float = Field(default=3.0, gt=0, le=30)  # seconds the webhook POST may take

    @field_validator("webhook")
    @classmethod
    def _http_url(cls, url: str | SecretRef | None) -> str | SecretRef | None:
        if isinstance(url, str) and not _is_http(url):
            raise ValueError("an http:// or https:// URL is expected")
        return url


class DenialCounter:
    """The fleet-wide sliding window of denials, per kind, under the namespace's keys."""

    def __init__(self, redis: Redis, namespace: str, settings: AlertSettings) -> None:
        self.prefix = f"{namespace}:security"
        self.settings = settings
        self._count = redis.register_script(_COUNT)

    def add(self, kind: str, subject: str) -> tuple[int, list[str]] | None:
        """Count one denial; (count, subjects) when it raises the alert of its window, else None."""
        settings = self.settings
        keys = [f"{self.prefix}:denials:{kind}", f"{self.prefix}:alerted:{kind}"]
        member = f"{uuid.uuid4().hex} {subject}"
        count, raised, members = self._count(keys, [member, settings.window, settings.threshold, KEPT, SUBJECTS])
        if not raised:
            return None
        subjects = dict.fromkeys(as_text(item).partition(" ")[2] for item in members)
        return int(count), sorted(subjects)


class Alerts:
    """A security-event listener: counts denials and raises an alert when a kind reaches its threshold."""

    def __init__(self, redis: Redis, namespace: str, settings: AlertSettings) -> None:
        self.redis = redis
        self.namespace = namespace
        self.settings = settings
        self.counter = DenialCounter(redis, namespace, settings)

    def __call__(self, kind: str, subject: str, detail: dict[str, Any]) -> None:
        if kind not in DENIALS:
            return
        try:
            raised = self.counter.add(kind, subject)
        except RedisError as exc:  # counting is best effort: the denial itself already happened and was logged
            log.warning("cannot count %s for alerts: %s", kind, type(exc).__name__)
            return
        if raised is not None:
            self.alert(kind, *raised)

    def alert(self, kind: str, count: int, subjects: list[str]) -> None:
        fields = {"kind": kind, "count": count, "threshold": self.settings.threshold, "window": self.settings.window,
                  "subjects": subjects, "namespace": self.namespace, "at": time.time()}  # fmt: skip
        log.warning("security alert %s", json.dumps(fields, sort_keys=True), extra={"security_alert": fields})
        if settings.records:
            record_operation(self.redis, self.namespace, "alert", ", ".join(subjects)[:200], detail=fields)
        if self.settings.webhook:
            send(self._webhook_url, {"event": "security-alert", **fields}, self.settings.timeout)

    def _webhook_url(self) -> str | None:
        """The webhook's URL; one kept in the vault is read as each alert is sent, so a new version needs no restart."""
        webhook = self.settings.webhook
        if not isinstance(webhook, SecretRef):
            return webhook
        try:
            url = Vault(self.redis, self.namespace).get(webhook.secret)
        except (VaultError, RedisError) as exc:
            log.warning("security alert webhook {secret: %s}: cannot read it: %s", webhook.secret, exc)
            return None
        if not _is_http(url):
            log.warning("security alert webhook {secret: %s}: not an http:// or https:// URL", webhook.secret)
            return None
        return url


def watch(redis: Redis, namespace: str, alerts: AlertSettings | None = None) -> list[Listener]:
    """Put this process's security events on the namespace's audit chain and count its denials for alerts;
    returns the listeners, for `unwatch` once `redis` is closed."""
    listeners: list[tuple[str, Listener]] = [
        (f"audit:{namespace}", audit_security(redis, namespace)),
        (f"alerts:{namespace}", Alerts(redis, namespace, alerts or AlertSettings())),
    ]
    for key, listener in listeners:
        on_security_event(listener, key)
    return [listener for _, listener in listeners]


def unwatch(listeners: list[Listener]) -> None:
    for listener in listeners:
        off_security_event(listener)


_sending: list[tuple[threading.Thread, float]] = []  # webhook POSTs under way, each with its deadline


def send(webhook: Callable[[], str | None], body: dict[str, Any], timeout: float) -> None:
    """POST body to the webhook's URL (None: nowhere) from a daemon thread, which finds the URL too; a process
    about to exit waits for it up to `timeout`."""
    thread = threading.Thread(target=_post, args=(webhook, body, timeout), name="mcpo-alert-webhook", daemon=True)
    _sending[:] = [(sent, deadline) for sent, deadline in _sending if sent.is_alive()]
    _sending.append((thread, time.monotonic() + timeout))
    thread.start()


def _post(webhook: Callable[[], str | None], body: dict[str, Any], timeout: float) -> None:
    url = webhook()
    if url is None:
        return
    # The URL may carry a token in its path or query (chat webhooks do): messages name its host only.
    where = f"{urlsplit(url).scheme}://{urlsplit(url).netloc.rpartition('@')[2]}"
    try:
        response = httpx2.post(url, json=body, timeout=timeout)
    except httpx2.HTTPError as exc:
        log.warning("security alert webhook %s failed: %s", where, type(exc).__name__)
        return
    if response.status_code >= 400:
        log.warning("security alert webhook %s answered HTTP %d", where, response.status_code)


@atexit.register
def _drain() -> None:
    # A CLI denial exits at once: give its alert's POST the time it was allowed.
    for thread, deadline in list(_sending):
        thread.join(max(0.0, deadline - time.monotonic()))


def _is_http(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.hostname)
