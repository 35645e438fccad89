"""TLS on the fleet's client connections: to Redis (`rediss://`) and to HTTP MCP servers.

Certificates are always checked. A `rediss://` URL connects with the CA bundle `MCPO_REDIS_CA` (the system
CAs when unset) and, if the server asks for one, the client certificate `MCPO_REDIS_CERT` / `MCPO_REDIS_KEY`;
the same options go to Celery's broker and result backend, whose own default for `rediss://` without options
would be no certificate check at all. An HTTP MCP server is checked against the system CAs, or the CA bundle
its `verify:` names; `verify: false` is refused unless MCPO_ALLOW_INSECURE_TLS is set.

This module sits in `workers` beside the kombu transport because celeryconfig imports it to build Celery's
settings, and anything under `orchestrator` would import celeryconfig back.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from redis import Redis

SECURE_SCHEME = "rediss://"


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


def connect_redis(url: str, **options: Any) -> Redis:
    """A Redis client for url, with the process's TLS settings when it is `rediss://`."""
    # Read at call time: celeryconfig imports this module to build Celery's settings.
    import celeryconfig

    settings = celeryconfig.settings
    return Redis.from_url(url, **redis_ssl(url, settings.redis_ca, settings.redis_cert, settings.redis_key), **options)


class InsecureTLSRefused(ValueError):
    """`verify: false` on a server while MCPO_ALLOW_INSECURE_TLS is not set."""


def check_verify(verify: bool | str, allow_insecure: bool) -> None:
    """Refuse switching certificate checks off unless the operator allowed it for this process."""
    if verify is False and not allow_insecure:
        raise InsecureTLSRefused(
            "'verify: false' turns certificate checks off; give the server's CA bundle instead "
            "('verify: path/to/ca.pem'), or set MCPO_ALLOW_INSECURE_TLS=1 to allow it"
        )


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
