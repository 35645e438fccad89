"""The environment settings every process shares (pydantic-settings), and the TLS rules that follow from them.

A leaf: it imports nothing of the project, so any module may read the settings (celeryconfig builds Celery's from
them) without an import cycle.

REDIS_URL selects a real Redis as broker and result backend; without it the orchestrator starts an
embedded Redis and sets both URLs itself. MCPO_BROKER_URL may point the broker elsewhere (amqp://).
DATABASE_URL selects the SQL records store (PostgreSQL in production); without it records go to a SQLite
file under MCPO_HOME. MCPO_RECORDS=off keeps no records at all. A `rediss://` URL connects with TLS, checking
the server's certificate against MCPO_REDIS_CA (default: the system CAs), with the client certificate
MCPO_REDIS_CERT / MCPO_REDIS_KEY when given. A `redis+sentinel://` URL names a Sentinel group instead of one
Redis (see workers/sentinel.py).
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

SECURE_SCHEME = "rediss://"


class Settings(BaseSettings):
    """Environment settings shared by the API, the CLI and workers."""

    model_config = SettingsConfigDict(env_prefix="MCPO_", extra="ignore")
    redis_url: str | None = Field(default=None, validation_alias=AliasChoices("REDIS_URL", "MCPO_REDIS_URL"))
    broker_url: str | None = None
    namespace: str = "mcpo"
    home: Path = Path.home() / ".mcp-orchestrator"
    config: Path | None = None
    visibility_timeout: int = 3600
    heartbeat_interval: float = Field(default=2.0, gt=0)  # a worker missing 3 beats is dead (workers/reclaim.py)
    result_expires: int = 86400
    run_ttl: int = 7 * 86400
    worker_concurrency: int = 100
    database_url: str | None = Field(default=None, validation_alias=AliasChoices("DATABASE_URL", "MCPO_DATABASE_URL"))
    records: bool = True
    redis_ca: Path | None = None  # CA bundle for rediss:// (broker, result backend, run state)
    redis_cert: Path | None = None  # client certificate for rediss://, when Redis asks for one
    redis_key: Path | None = None  # its private key (default: inside redis_cert)
    allow_insecure_tls: bool = False  # lets an HTTP MCP server say `verify: false`
    redis_outage: float = 60.0  # seconds a worker waits for Redis to come back (a restart) before a step fails
    max_config_bytes: int = 8 * 1024 * 1024  # a configuration file; workflow files have `limits.workflow_bytes`
    # Seconds a Redis client of ours waits to connect or for an answer; None: for ever (workers, whose Redis may
    # pause them rightly). The CLI's commands set 5, so a frozen Redis is an error, not a hang.
    redis_timeout: float | None = None

    def redis_ssl(self, url: str | None) -> dict[str, Any] | None:
        """Celery's `broker_use_ssl` / `redis_backend_use_ssl` for url: None unless it is rediss://."""
        return redis_ssl(url or "", self.redis_ca, self.redis_cert, self.redis_key) or None

    @property
    def records_url(self) -> str:
        """The records database: DATABASE_URL, else the SQLite file of the embedded default."""
        return self.database_url or f"sqlite:///{self.home / 'records.db'}"


def redis_ssl(url: str, ca: Path | None = None, cert: Path | None = None, key: Path | None = None) -> dict[str, Any]:
    """redis-py's SSL keyword arguments for url (also the shape of Celery's `broker_use_ssl` and
    `redis_backend_use_ssl`); empty for a plain `redis://` URL, where they would switch TLS on."""
    if not url.startswith(SECURE_SCHEME):
        return {}
    options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    if ca is not None:
        options["ssl_ca_certs"] = str(ca)
    if cert is not None:
        options["ssl_certfile"] = str(cert)
        options["ssl_keyfile"] = str(key if key is not None else cert)
    return options


class InsecureTLSRefused(ValueError):
    """`verify: false` on a server while MCPO_ALLOW_INSECURE_TLS is not set."""


def check_verify(verify: bool | str, allow_insecure: bool) -> None:
    """Refuse switching certificate checks off unless the operator allowed it for this process."""
    if verify is False and not allow_insecure:
        raise InsecureTLSRefused(
            "'verify: false' turns certificate checks off; give the server's CA bundle instead "
            "('verify: path/to/ca.pem'), or set MCPO_ALLOW_INSECURE_TLS=1 to allow it"
        )


settings = Settings()
