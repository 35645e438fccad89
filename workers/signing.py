"""Celery message signing: with `access.signing` configured, every task message is signed with this process's
X.509 key (Celery's `auth` serializer over JSON) and workers accept only messages whose signature verifies
against a certificate in the trusted store. A forged or altered message pushed into Redis is refused, and
reported as a security event, before any task code runs.

Signing is global to the process (kombu's serializer registry), so it is set up once, at start: by the
orchestrator before its first message, by a worker before it consumes.
"""

from __future__ import annotations

from typing import Any

from celery.signals import task_rejected
from celery.worker.consumer import Consumer

from orchestrator.config import Config
from orchestrator.security import security_event
from workers.app import app


def use_signing(config: Config) -> bool:
    """Sign and accept only signed task messages when the configuration asks for it; True when it does."""
    signing = config.access.signing if config.access is not None else None
    if signing is None:
        return False
    base = config.base_dir
    app.conf.update(task_serializer="auth", accept_content=["auth"], worker_consumer=f"{__name__}:SigningConsumer")
    app.setup_security(
        allowed_serializers=["json", "application/json"],  # results stay JSON; the pickle family stays disabled
        key=str(base / signing.key),
        cert=str(base / signing.certificate),
        store=str(base / signing.store),
        digest=signing.digest,
        serializer="json",
    )
    return True


class SigningConsumer(Consumer):  # type: ignore[misc]
    """The worker's consumer, reporting messages whose signature does not verify."""

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        security_event("message-refused", "anonymous", {"reason": f"{type(exc).__name__}: {exc}",
                                                        "queue": _queue(message)})  # fmt: skip
        super().on_decode_error(message, exc)


@task_rejected.connect  # type: ignore[untyped-decorator]
def _unsigned(message: Any = None, exc: Exception | None = None, **_: Any) -> None:
    # An unsigned message (plain JSON) is refused as content the worker does not accept.
    if app.conf.task_serializer == "auth":
        security_event("message-refused", "anonymous", {"reason": f"{type(exc).__name__}: {exc}",
                                                        "queue": _queue(message)})  # fmt: skip


def _queue(message: Any) -> str:
    return str((getattr(message, "delivery_info", None) or {}).get("routing_key", ""))
