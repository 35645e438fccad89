"""TLS on the fleet's client connections: to Redis (`rediss://`) and to HTTP MCP servers.

Certificates are always checked. A `rediss://` URL connects with the CA bundle `MCPO_REDIS_CA` (the system
CAs when unset) and, if the server asks for one, the client certificate `MCPO_REDIS_CERT` / `MCPO_REDIS_KEY`;
the same options go to Celery's broker and result backend, whose own default for `rediss://` without options
would be no certificate check at all. An HTTP MCP server is checked against the system CAs, or the CA bundle
its `verify:` names; `verify: false` is refused when the configuration is loaded (orchestrator/config.py) unless
MCPO_ALLOW_INSECURE_TLS is set. The options for `rediss://` come from the settings (orchestrator/settings.py).
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from redis import Redis

from orchestrator.settings import redis_ssl, settings
from workers.sentinel import SentinelURL, is_sentinel


def connect_redis(url: str, **options: Any) -> Redis:
    """A Redis client for url, with the process's TLS settings when it is `rediss://`; for a Sentinel URL, a client
    of the group's master that follows its failovers."""
    if settings.redis_timeout:
        options = {"socket_timeout": settings.redis_timeout, "socket_connect_timeout": settings.redis_timeout,
                   **options}  # fmt: skip
    if is_sentinel(url):
        return SentinelURL.parse(url).client(**options)
    return Redis.from_url(url, **redis_ssl(url, settings.redis_ca, settings.redis_cert, settings.redis_key), **options)


def redis_address(url: str) -> str:
    """HOST:PORT of a Redis URL, or a Sentinel URL without its password, for messages."""
    if is_sentinel(url):
        return str(SentinelURL.parse(url))
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}"


def tls_refused(exc: BaseException) -> bool:
    """Whether a connection error came from the TLS handshake (a certificate not trusted, a protocol refused): a
    configuration fault to report as it is, not an outage to work around."""
    import ssl

    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLError):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def server_verify(verify: bool | str) -> ssl.SSLContext | bool:
    """httpx2's `verify` for an HTTP MCP server: True (the default CAs), False (insecure, allowed), or a context
    trusting only the CA bundle (a PEM file or a directory of them) verify names."""
    if isinstance(verify, bool):
        return verify
    bundle = Path(verify)
    if not bundle.exists():
        raise FileNotFoundError(f"the CA bundle {bundle} (the server's 'verify') does not exist")
    if bundle.is_dir():
        return ssl.create_default_context(capath=str(bundle))
    return ssl.create_default_context(cafile=str(bundle))
