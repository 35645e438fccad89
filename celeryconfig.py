"""Celery settings, read from the environment (pydantic-settings).

REDIS_URL selects a real Redis as broker and result backend; without it the orchestrator starts an
embedded Redis and sets both URLs itself. MCPO_BROKER_URL may point the broker elsewhere (amqp://).
DATABASE_URL selects the SQL records store (PostgreSQL in production); without it records go to a SQLite
file under MCPO_HOME. MCPO_RECORDS=off keeps no records at all. A `rediss://` URL connects with TLS, checking
the server's certificate against MCPO_REDIS_CA (default: the system CAs), with the client certificate
MCPO_REDIS_CERT / MCPO_REDIS_KEY when given (see workers/tls.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from workers.tls import redis_ssl
from workers.transport import transport_for


class Settings(BaseSettings):
    """Environment settings shared by the API, the CLI and workers."""

    model_config = SettingsConfigDict(env_prefix="MCPO_", extra="ignore")
    redis_url: str | None = Field(default=None, validation_alias=AliasChoices("REDIS_URL", "MCPO_REDIS_URL"))
    broker_url: str | None = None
    namespace: str = "mcpo"
    home: Path = Path.home() / ".mcp-orchestrator"
    config: Path | None = None
    visibility_timeout: int = 3600
    result_expires: int = 86400
    run_ttl: int = 7 * 86400
    worker_concurrency: int = 100
    database_url: str | None = Field(default=None, validation_alias=AliasChoices("DATABASE_URL", "MCPO_DATABASE_URL"))
    records: bool = True
    redis_ca: Path | None = None  # CA bundle for rediss:// (broker, result backend, run state)
    redis_cert: Path | None = None  # client certificate for rediss://, when Redis asks for one
    redis_key: Path | None = None  # its private key (default: inside redis_cert)
    allow_insecure_tls: bool = False  # lets an HTTP MCP server say `verify: false`
    max_config_bytes: int = 8 * 1024 * 1024  # a configuration file; workflow files have `limits.workflow_bytes`

    def redis_ssl(self, url: str | None) -> dict[str, Any] | None:
        """Celery's `broker_use_ssl` / `redis_backend_use_ssl` for url: None unless it is rediss://."""
        return redis_ssl(url or "", self.redis_ca, self.redis_cert, self.redis_key) or None

    @property
    def records_url(self) -> str:
        """The records database: DATABASE_URL, else the SQLite file of the embedded default."""
        return self.database_url or f"sqlite:///{self.home / 'records.db'}"


settings = Settings()

broker_url = settings.broker_url or settings.redis_url
broker_transport = transport_for(broker_url or "")
result_backend = settings.redis_url
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
broker_transport_options = {"visibility_timeout": settings.visibility_timeout}
result_backend_transport_options = {"visibility_timeout": settings.visibility_timeout}
result_expires = settings.result_expires
broker_connection_retry_on_startup = True
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
