"""The Celery app every process shares, and the queue names it routes to."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import after_setup_logger, after_setup_task_logger

import celeryconfig
from orchestrator import redaction
from workers.transport import transport_for

app = Celery("mcp_orchestrator", include=["tasks.calls"])
app.config_from_object(celeryconfig)
# Canvas messages are rebuilt in the worker against the default app: it must be this one.
app.set_default()


def _redact_logs(logger: logging.Logger, **_: Any) -> None:
    """Every handler a worker logs through redacts secrets, DEBUG included (Celery's task logger does not
    propagate to the root's handlers, so it gets the filter too)."""
    redaction.install(logger)


after_setup_logger.connect(_redact_logs, weak=False)
after_setup_task_logger.connect(_redact_logs, weak=False)


def queue_for(service: str) -> str:
    """The queue a service's worker pool consumes."""
    return f"{celeryconfig.settings.namespace}.{service}"


def control_queue() -> str:
    """The queue for run bookkeeping (finishing a run); every worker consumes it."""
    return f"{celeryconfig.settings.namespace}.control"


def served_queues(timeout: float = 1.0) -> set[str]:
    """The queues some running worker consumes, as the workers answer a broadcast within timeout."""
    replies = app.control.inspect(timeout=timeout).active_queues() or {}
    return {queue["name"] for queues in replies.values() for queue in queues}


def use_broker(url: str, broker_url: str | None = None) -> None:
    """Point this process's app at a Redis (result backend) and a broker (Redis unless given)."""
    broker = broker_url or url
    tls = celeryconfig.settings.redis_ssl
    app.conf.update(broker_url=broker, broker_transport=transport_for(broker), result_backend=url,
                    broker_use_ssl=tls(broker), redis_backend_use_ssl=tls(url))  # fmt: skip


def release_result_subscriptions() -> None:
    """Close the result backend's pub/sub connection and forget its subscriptions.

    Celery subscribes to group results in Redis and unsubscribes when they are garbage-collected,
    which at interpreter exit finds Redis gone (or Python half torn down). Runs are followed through
    the run store, so nothing waits on those subscriptions.
    """
    consumer = getattr(app.backend, "result_consumer", None)
    if consumer is not None and getattr(consumer, "_pubsub", None) is not None:
        consumer.stop()
        consumer.subscribed_to.clear()
