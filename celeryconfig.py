"""Celery settings, read from the environment (pydantic-settings).

REDIS_URL selects a real Redis as broker and result backend; without it the orchestrator starts an
embedded Redis and sets both URLs itself. MCPO_BROKER_URL may point the broker elsewhere (amqp://).
DATABASE_URL selects the SQL records store (PostgreSQL in production); without it records go to a SQLite
file under MCPO_HOME. MCPO_RECORDS=off keeps no records at all.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

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

    @property
    def records_url(self) -> str:
        """The records database: DATABASE_URL, else the SQLite file of the embedded default."""
        return self.database_url or f"sqlite:///{self.home / 'records.db'}"


settings = Settings()

broker_url = settings.broker_url or settings.redis_url
broker_transport = transport_for(broker_url or "")
result_backend = settings.redis_url
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
worker_prefetch_multiplier = 1
# Task events cost the worker a publish per state change; Flower switches them on when it starts watching.
worker_send_task_events = False
task_send_sent_event = False
worker_hijack_root_logger = False
