"""Server credentials in a worker process: vault secrets read at connection time and on each HTTP request.

Values are cached for a second, so a new version of a secret reaches every pooled HTTP connection on its
next request and every stdio server within a second, at the cost of about one Redis read per secret per
second. A value is never logged: messages name the secret and its version only. Each version a process reads
is reported once (`secret-read`), not each second it is read again.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Generator

import httpx2
from redis.exceptions import RedisError

from orchestrator.config import StdioServer
from orchestrator.errors import VaultError
from orchestrator.security.events import security_event
from orchestrator.security.secretref import SecretRef
from orchestrator.security.vault import Vault

log = logging.getLogger(__name__)
FRESH_FOR = 1.0  # seconds a value read from the vault is used before it is read again


class Credentials:
    """A worker's view of the vault: the current version of each secret, cached for FRESH_FOR seconds."""

    def __init__(self, vault: Vault | None, fresh_for: float = FRESH_FOR) -> None:
        self._vault = vault
        self._fresh_for = fresh_for
        self._values: dict[str, tuple[int, str, float]] = {}  # name -> (version, value, read at)
        self._versions: tuple[dict[str, int], float] = ({}, 0.0)
        self._reported: dict[str, int] = {}  # name -> the version last read from the vault and reported
        self._lock = threading.Lock()

    def current(self, name: str, read_after: float | None = None) -> tuple[int, str]:
        """(version, value): from the cache while fresh and, when read_after is given, read after it."""
        cached = self._values.get(name)
        now = time.monotonic()
        stale = cached is None or now - cached[2] > self._fresh_for
        if cached is not None and not stale and (read_after is None or cached[2] > read_after):
            return cached[0], cached[1]
        with self._lock:
            version, value = self._vault_or_fail(name).current(name)
            self._values[name] = (version, value, time.monotonic())
            new = self._reported.get(name) != version
            self._reported[name] = version
        if new:
            self._report(name, version)
        return version, value

    def _report(self, name: str, version: int) -> None:
        host = socket.gethostname()
        detail = {"secret": name, "version": version, "worker": host, "pid": os.getpid(),
                  "namespace": self.vault.namespace}  # fmt: skip
        security_event("secret-read", f"worker:{host}", detail)

    @property
    def vault(self) -> Vault:
        if self._vault is None:
            raise VaultError("OAuth tokens are kept in the vault, but this process has no vault")
        return self._vault

    def versions(self, names: list[str]) -> dict[str, int]:
        """The current version of each secret, re-read at most once per FRESH_FOR seconds."""
        known, at = self._versions
        if set(names) <= set(known) and time.monotonic() - at <= self._fresh_for:
            return {name: known[name] for name in names}
        fresh = self._vault_or_fail(names[0] if names else "").versions(names)
        self._versions = ({**known, **fresh}, time.monotonic())
        return fresh

    def environment(self, spec: StdioServer) -> tuple[dict[str, str], dict[str, int]]:
        """A stdio server's environment with its secrets resolved (newest versions), and those versions."""
        env: dict[str, str] = {}
        versions: dict[str, int] = {}
        for key, value in spec.env.items():
            if isinstance(value, SecretRef):
                versions[value.secret], env[key] = self.current(value.secret, read_after=time.monotonic())
            else:
                env[key] = value
        return env, versions

    def _vault_or_fail(self, name: str) -> Vault:
        if self._vault is None:
            raise VaultError(f"secret '{name}' is needed, but this process has no vault")
        return self._vault


class Refusals:
    """The last credential an HTTP server refused after a refresh, and when.

    Requests on one connection run concurrently, so a later success must not clear an earlier refusal:
    a failed call asks whether a refusal happened while it was under way.
    """

    def __init__(self) -> None:
        self._last: tuple[str, float] | None = None

    def note(self, what: str) -> None:
        self._last = (what, time.monotonic())

    def since(self, started: float) -> str | None:
        """What was refused at or after `started` (a monotonic time), if anything."""
        return self._last[0] if self._last is not None and self._last[1] >= started else None


class SecretAuth(httpx2.Auth):
    """Puts vault secrets into an HTTP server's request headers, reading the current version per request.

    A 401 or 403 re-reads the secrets and sends the request once more (a rotation may have just replaced
    the value); if that is refused too, the response goes back to the MCP client as it is and `refusals`
    names the secret, so the caller's error can say which credential the server refused.
    """

    requires_request_body = True  # the retry sends the same body again

    def __init__(self, server: str, headers: dict[str, tuple[str, str]], credentials: Credentials) -> None:
        self.server = server
        self.headers = headers
        self.credentials = credentials
        self.refusals = Refusals()

    def auth_flow(self, request: httpx2.Request) -> Generator[httpx2.Request, httpx2.Response, None]:
        sent_at = time.monotonic()
        versions = self._apply(request, None)
        response = yield request
        refused = response.status_code
        if refused not in (401, 403):
            return
        retried = self._apply(request, sent_at)
        response = yield request
        if response.status_code in (401, 403):
            rejected = self._describe(retried, response.status_code)
            self.refusals.note(rejected)
            log.warning("MCP server '%s' refused %s after a refresh", self.server, rejected)
            return
        refreshed = self._describe(versions, refused)
        log.info("MCP server '%s' refused %s, then accepted it refreshed", self.server, refreshed)

    def _apply(self, request: httpx2.Request, read_after: float | None) -> dict[str, int]:
        versions: dict[str, int] = {}
        for header, (secret, prefix) in self.headers.items():
            try:
                versions[secret], value = self.credentials.current(secret, read_after)
            except (VaultError, RedisError) as exc:
                # Raising here would break the whole MCP session; the server's refusal will report it.
                log.warning("MCP server '%s': cannot read secret '%s': %s", self.server, secret, type(exc).__name__)
                continue
            request.headers[header] = f"{prefix}{value}"
        return versions

    def _describe(self, versions: dict[str, int], status: int) -> str:
        names = ", ".join(f"secret '{name}' version {version}" for name, version in sorted(versions.items()))
        return f"{names or 'its credential'} (HTTP {status})"
