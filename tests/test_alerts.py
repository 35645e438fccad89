"""Security alerts: repeated denials, counted fleet-wide in Redis, raise one alert per window — a structured
WARNING, a row on the audit chain and a webhook POST (real Redis, a real HTTP server receiving it). The
counting rules and the listener wiring are checked on fakeredis."""

from __future__ import annotations

import http.server
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fakeredis
import pytest
from redis import Redis
from sqlalchemy import select

from orchestrator.config import parse_config
from orchestrator.errors import ConfigError, PermissionDenied
from orchestrator.history import audit
from orchestrator.history.events import buffer_key
from orchestrator.history.flusher import Flusher
from orchestrator.history.records import RecordStore
from orchestrator.history.tables import AuditRecord
from orchestrator.security import alerts
from orchestrator.security.access import AccessControl, AccessSettings
from orchestrator.security.alerts import AlertSettings, DenialCounter, unwatch, watch
from orchestrator.security.events import security_event
from orchestrator.security.identity import Identity
from orchestrator.security.secretref import SecretRef
from orchestrator.security.vault import KeyRing, Vault

from .conftest import RecordsDatabase, free_port


def counter(**settings: Any) -> DenialCounter:
    return DenialCounter(fakeredis.FakeRedis(), "alerts-test", AlertSettings(**settings))


def test_below_the_threshold_nothing_is_raised() -> None:
    denials = counter(threshold=3)
    assert denials.add("permission-denied", "alice") is None
    assert denials.add("permission-denied", "bob") is None


def test_the_threshold_raises_one_alert_per_window_naming_the_subjects() -> None:
    denials = counter(threshold=3)
    assert [denials.add("call-refused", subject) for subject in ("mallory", "anonymous")] == [None, None]
    assert denials.add("call-refused", "mallory") == (3, ["anonymous", "mallory"])
    assert [denials.add("call-refused", "mallory") for _ in range(10)] == [None] * 10


def test_each_kind_is_counted_apart() -> None:
    denials = counter(threshold=3)
    for kind in ("permission-denied", "call-refused", "message-refused"):
        assert [denials.add(kind, "x") for _ in range(2)] == [None, None]


def test_the_window_slides_and_a_later_window_alerts_again() -> None:
    denials = counter(threshold=2, window=1)
    assert denials.add("message-refused", "first") is None
    time.sleep(1.2)  # the first denial falls out of the window
    assert denials.add("message-refused", "second") is None
    assert denials.add("message-refused", "third") == (2, ["second", "third"])
    time.sleep(1.2)  # the alert's window is over: the marker is gone with it
    assert denials.add("message-refused", "fourth") is None
    assert denials.add("message-refused", "fifth") == (2, ["fifth", "fourth"])


@pytest.mark.parametrize(
    ("alerts_section", "message"),
    [
        ({"webhook": "ftp://alerts.example.com/"}, "field 'access.alerts.webhook': an http:// or https:// URL"),
        ({"webhook": "https://"}, "field 'access.alerts.webhook': an http:// or https:// URL"),
        ({"threshold": 0}, "field 'access.alerts.threshold': Input should be greater than or equal to 1"),
        ({"window": -5}, "field 'access.alerts.window': Input should be greater than 0"),
        ({"treshold": 5}, "field 'access.alerts.treshold': Extra inputs are not permitted"),
    ],
)
def test_alert_settings_are_checked(alerts_section: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"access": {"alerts": alerts_section}})
    settings = parse_config({"access": {"alerts": {"threshold": 3, "window": 30, "webhook": "https://h/x"}}}).access
    assert settings is not None and settings.alerts == AlertSettings(threshold=3, window=30, webhook="https://h/x")
    settings = parse_config({"access": {"alerts": {"webhook": {"secret": "alert-hook"}}}}).access
    assert settings is not None and settings.alerts.webhook == SecretRef(secret="alert-hook")


def test_one_sink_per_namespace_hears_each_event_once() -> None:
    redis = fakeredis.FakeRedis()
    namespace = f"sink-{uuid.uuid4().hex[:8]}"
    settings = AlertSettings(threshold=2)
    first, second = watch(redis, namespace, settings), watch(redis, namespace, settings)  # an embedded API and worker
    try:
        security_event("permission-denied", "mallory", {"where": "test"})
        assert redis.llen(buffer_key(namespace)) == 1  # audited once
        unwatch(first)  # the API closed: the worker's listeners still hear
        security_event("permission-denied", "mallory", {"where": "test"})
        assert redis.llen(buffer_key(namespace)) == 3  # the second denial and the alert it raised (counted once each)
        assert json.loads(redis.lindex(buffer_key(namespace), -1) or b"{}")["action"] == "alert"
    finally:
        unwatch(first + second)
    security_event("permission-denied", "mallory", {"where": "test"})
    assert redis.llen(buffer_key(namespace)) == 3  # nobody watches any more


# Real Redis, a real webhook receiver, real denials at the API's access control.


@dataclass
class Webhook:
    """An HTTP server that keeps the JSON body of every POST it gets."""

    server: http.server.ThreadingHTTPServer
    bodies: list[dict[str, Any]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/security?token=hook-secret"


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    bodies: list[dict[str, Any]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield Webhook(server, bodies)
    server.shutdown()
    server.server_close()


@dataclass
class Denials:
    """Access control of a namespace of its own, watched as an API process watches it."""

    redis: Redis
    namespace: str
    access: AccessControl
    store: RecordStore

    @property
    def mallory(self) -> str:
        """A subject of this test's own, to find its rows by."""
        return f"mallory-{self.namespace}"

    def deny(self, subject: str) -> None:
        """One real denial: no token (anonymous), else a viewer who may not run."""
        with pytest.raises(PermissionDenied):
            if subject == "anonymous":
                self.access.require(None, "run", "workflow:deploy")
            else:
                self.access.policy.check(Identity(subject, ("viewer",), None, None, "issued"), "run", "workflow:deploy")

    def alert_logs(self, caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
        # Other namespaces this test process watches (a session's orchestrator) may alert too: only ours count.
        found = [getattr(record, "security_alert", None) for record in caplog.records]
        return [fields for fields in found if fields is not None and fields["namespace"] == self.namespace]

    def audited(self, action: str) -> list[AuditRecord]:
        Flusher(self.redis, self.namespace, self.store).flush(60)
        with self.store.session() as session:
            rows = session.scalars(select(AuditRecord).where(AuditRecord.action == action).order_by(AuditRecord.seq))
            return [row for row in rows if self.namespace in (row.detail or "") + (row.who or "")]


@pytest.fixture
def denials(redis_url: str, records_database: RecordsDatabase) -> Iterator[Any]:
    redis = Redis.from_url(redis_url)
    namespace = f"alerts-{uuid.uuid4().hex[:8]}"
    store = RecordStore(records_database.url)
    watching: list[Any] = []

    def start(settings: AlertSettings) -> Denials:
        watching.extend(watch(redis, namespace, settings))
        return Denials(redis, namespace, AccessControl(AccessSettings(alerts=settings), redis, namespace), store)

    yield start
    unwatch(watching)
    for key in redis.scan_iter(f"{namespace}:*"):
        redis.delete(key)
    redis.close()


def test_repeated_denials_raise_one_alert_one_webhook_post_and_an_audit_row(
    denials: Any, webhook: Webhook, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="mcpo.security")
    fleet = denials(AlertSettings(threshold=4, window=60, webhook=webhook.url))
    for subject in ("anonymous", fleet.mallory) * 3 + ("eve",):
        fleet.deny(subject)
    alerts._drain()  # the webhook POST is sent from a thread of its own

    (logged,) = fleet.alert_logs(caplog)
    assert {k: logged[k] for k in ("kind", "count", "window", "subjects", "threshold")} == {
        "kind": "permission-denied", "count": 4, "window": 60.0, "subjects": ["anonymous", fleet.mallory],
        "threshold": 4,
    }  # fmt: skip
    assert [body for body in webhook.bodies if body.get("namespace") == fleet.namespace] == [
        {"event": "security-alert", **logged}
    ]
    (row,) = fleet.audited("alert")
    assert json.loads(row.detail or "{}") == logged and row.who == f"anonymous, {fleet.mallory}"
    assert len(fleet.audited("permission-denied")) == 3  # mallory's denials, each once
    with fleet.store.session() as session:
        assert audit.verify(session)[1] is None  # the chain holds with the alert in it


def test_denials_below_the_threshold_raise_nothing(
    denials: Any, webhook: Webhook, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="mcpo.security")
    fleet = denials(AlertSettings(threshold=4, window=60, webhook=webhook.url))
    for subject in ("anonymous", fleet.mallory, "anonymous"):
        fleet.deny(subject)
    alerts._drain()
    assert fleet.alert_logs(caplog) == []
    assert [body for body in webhook.bodies if body.get("namespace") == fleet.namespace] == []
    assert fleet.audited("alert") == []


def test_a_dead_webhook_does_not_break_the_denial(denials: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mcpo.security")
    dead = f"http://127.0.0.1:{free_port()}/hooks/security?token=hook-secret"  # nothing listens there
    fleet = denials(AlertSettings(threshold=1, window=60, webhook=dead, timeout=2))
    fleet.deny("anonymous")  # raises PermissionDenied as ever
    alerts._drain()
    assert len(fleet.alert_logs(caplog)) == 1
    failures = [r.getMessage() for r in caplog.records if r.getMessage().startswith("security alert webhook")]
    assert failures == [f"security alert webhook {dead.split('/hooks')[0]} failed: ConnectError"]
    assert "hook-secret" not in caplog.text


def test_a_webhook_kept_in_the_vault_is_read_as_each_alert_is_sent(
    denials: Any, webhook: Webhook, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="mcpo.security")
    fleet = denials(AlertSettings(threshold=1, window=1, webhook=SecretRef(secret="alert-hook")))
    fleet.deny("anonymous")  # no such secret yet: the alert is raised and logged, the POST is not sent
    alerts._drain()
    assert "security alert webhook {secret: alert-hook}: cannot read it: no secret 'alert-hook'" in caplog.text
    KeyRing.from_environment().ensure()
    Vault(fleet.redis, fleet.namespace).set("alert-hook", webhook.url)  # its token: hook-secret
    time.sleep(1.1)  # the next window
    fleet.deny("anonymous")
    alerts._drain()
    posted = [body for body in webhook.bodies if body.get("namespace") == fleet.namespace]
    assert posted == [{"event": "security-alert", **fleet.alert_logs(caplog)[-1]}]
    assert "hook-secret" not in caplog.text
