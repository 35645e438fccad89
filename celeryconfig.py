"""Celery's settings, built from the environment settings (orchestrator/settings.py) and loaded by workers/app.py.

A `rediss://` URL connects with TLS, checking the server's certificate (see orchestrator/settings.py); a
`redis+sentinel://` URL names a Sentinel group instead of one Redis (see workers/sentinel.py).
"""

from __future__ import annotations

# Re-exported for code that knows Celery's configuration module only; the project reads `orchestrator.settings`.
from orchestrator.settings import Settings as Settings
from orchestrator.settings import settings as settings
from workers.sentinel import celery_url, transport_options
from workers.transport import transport_for

# A Sentinel URL (workers/sentinel.py) becomes kombu's form, with the master's name in the transport options.
broker_url = celery_url(settings.broker_url or settings.redis_url)
broker_transport = transport_for(settings.broker_url or settings.redis_url or "")
result_backend = celery_url(settings.redis_url)
# Without these kombu would connect to rediss:// without checking the certificate (its default is CERT_NONE).
broker_use_ssl = settings.redis_ssl(broker_url)
redis_backend_use_ssl = settings.redis_ssl(result_backend)
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]
# A worker that dies mid-call leaves its message unacknowledged: Redis hands it to another worker
# after the visibility timeout, which must outlast the longest step (checked when a run is enqueued).
task_acks_late = True
task_reject_on_worker_lost = True
# kombu sweeps for messages past the visibility timeout every interval x throttle seconds (100 s by default):
# every 10 s here, so the backstop for a dead worker's messages is the visibility timeout + 10 s.
broker_transport_options = {
    "visibility_timeout": settings.visibility_timeout,
    "unacked_restore_interval": 10,
    "unacked_restore_throttle": 1,
    **transport_options(settings.broker_url or settings.redis_url),
}
result_backend_transport_options = {"visibility_timeout": settings.visibility_timeout,
                                    **transport_options(settings.redis_url)}  # fmt: skip
result_expires = settings.result_expires
broker_connection_retry_on_startup = True
# A task that sends the chain's next call while Redis restarts waits for it (up to MCPO_REDIS_OUTAGE) rather than
# failing the run; Celery's default gives up after about 3 s.
task_publish_retry_policy = {"max_retries": int(settings.redis_outage), "interval_start": 0, "interval_step": 0.5,
                             "interval_max": 1}  # fmt: skip
task_default_queue = f"{settings.namespace}.control"
# Broadcasts (inspect, revoke, shutdown) and task events stay within a namespace: fleets sharing a Redis
# would otherwise answer, and a signing fleet refuse, each other's control messages.
control_exchange = settings.namespace
event_exchange = f"{settings.namespace}.celeryev"
worker_prefetch_multiplier = 1
# Task events cost the worker a publish per state change; Flower switches them on when it starts watching.
worker_send_task_events = False
task_send_sent_event = False
worker_hijack_root_logger = False
# Every worker checks each task message before it runs: a bad one is quarantined, not redelivered for ever.
worker_consumer = "workers.quarantine:QuarantineConsumer"
