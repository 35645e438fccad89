"""The Celery app every process shares, and the queue names it routes to."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.canvas import Signature
from celery.signals import after_setup_logger, after_setup_task_logger

import celeryconfig
from orchestrator.messages import StepCall
from orchestrator.security import redaction
from orchestrator.settings import settings
from workers import reclaim
from workers.sentinel import celery_url, transport_options
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
reclaim.wire()


def queue_for(service: str) -> str:
    """The queue a service's worker pool consumes."""
    return f"{settings.namespace}.{service}"


def step_signature(step: StepCall) -> Signature:
    """The signature of one step's call, routed to its service's queue and named `service.tool`.

    Flower and logs show `step.shown()`: Celery would otherwise build that text from every field.
    """
    return app.signature("mcpo.call", kwargs=step.message(), immutable=True, queue=queue_for(step.service),
                         shadow=f"{step.service}.{step.tool}", kwargsrepr=step.shown(), declare=[])  # fmt: skip


def batch_signature(messages: list[dict[str, Any]]) -> Signature:
    """The signature of several calls of one run to one service, made at once by one worker (orchestrator/
    batching.py): named `service.tool` times N and shown with its step ids. The run's caller token goes once."""
    first = messages[0]
    tools = sorted({message["tool"] for message in messages})
    tool = tools[0] if len(tools) == 1 else "{" + ",".join(tools) + "}"
    caller = first.get("caller")
    calls = [{name: value for name, value in message.items() if name != "caller"} for message in messages]
    shown = f"run={first['run_id']} steps={','.join(message['step_id'] for message in messages)}"
    name = f"{first['service']}.{tool} \N{MULTIPLICATION SIGN}{len(messages)}"
    return app.signature("mcpo.batch", kwargs={"calls": calls, **({"caller": caller} if caller else {})},
                         immutable=True, queue=queue_for(first["service"]), shadow=name, kwargsrepr=shown[:500],
                         declare=[])  # fmt: skip


def control_queue() -> str:
    """The queue for run bookkeeping (finishing a run); every worker consumes it."""
    return f"{settings.namespace}.control"


def served_queues(timeout: float = 1.0) -> set[str]:
    """The queues some running worker consumes, as the workers answer a broadcast within timeout."""
    replies = app.control.inspect(timeout=timeout).active_queues() or {}
    return {queue["name"] for queues in replies.values() for queue in queues}


def use_broker(url: str, broker_url: str | None = None) -> None:
    """Point this process's app at a Redis (result backend) and a broker (Redis unless given); either may be a
    Sentinel URL, given to Celery in kombu's form with the master's name in the transport options."""
    broker = broker_url or url
    tls = settings.redis_ssl
    if app.conf.broker_url != celery_url(broker):
        # The app's connection and producer pools were built for the previous broker: they would go on using it.
        app._after_fork()
    if app.conf.result_backend != celery_url(url):
        # The result backend Celery keeps once made (per thread, or shared when thread-safe) is the previous one's.
        app._local.__dict__.pop("backend", None)
        app._backend_cache = None
    conf = app.conf
    conf.update(broker_url=celery_url(broker), broker_transport=transport_for(broker), result_backend=celery_url(url),
                broker_use_ssl=tls(broker), redis_backend_use_ssl=tls(url), mcpo_redis_url=url,
                broker_transport_options={**conf.broker_transport_options, **transport_options(broker)},
                result_backend_transport_options={**conf.result_backend_transport_options,
                                                  **transport_options(url)})  # fmt: skip


def redis_url() -> str:
    """The Redis of run state, as use_broker (or REDIS_URL) gave it: for a Sentinel group the result backend's URL
    is kombu's form, which names no master."""
    return str(app.conf.get("mcpo_redis_url") or settings.redis_url or app.conf.result_backend)


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
