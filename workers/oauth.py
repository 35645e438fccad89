"""OAuth 2.1 for HTTP MCP servers: the MCP SDK's providers obtain the tokens, the vault keeps them for the fleet.

A server's access token lives in the vault (`<namespace>:oauth:<server>`, encrypted under the vault's key ring),
where every worker reads it. When it falls due (`refresh_before` seconds before it expires, at most a quarter
of its lifetime), the first worker to take the server's Redis lock has an SDK provider fetch a new one while
every other worker keeps sending the current token; a worker whose token is about to expire waits until the
new one is stored. So one token request serves the whole fleet, before the old token expires.

The SDK's providers keep tokens in memory and ask for one only when the server answers 401. A refresh therefore
builds a new provider over a view of the storage that holds no token, hands it the request about to be sent,
and lets the SDK run its own flow (protected resource and authorization server discovery, the grant, the retry
with the token) and store what it got. Client-credentials grants carry no refresh token (RFC 6749 §4.4.3): a
refresh is a new grant. No token or credential is logged: messages name the server and the client only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator
from dataclasses import dataclass

import anyio
import httpx2
from mcp.client.auth.extensions.client_credentials import (
    ClientCredentialsOAuthProvider,
    PrivateKeyJWTOAuthProvider,
    SignedJWTParameters,
)
from mcp.client.auth.extensions.identity_assertion import IdentityAssertionOAuthProvider
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken
from redis.lock import Lock

from orchestrator.config import HttpServer, OAuthSettings
from orchestrator.errors import SecretUndecryptable
from orchestrator.security.secretref import SecretRef
from orchestrator.security.vault import Vault
from orchestrator.text import as_text
from workers.credentials import Credentials, Refusals

log = logging.getLogger(__name__)
REFRESH_SHARE = 0.25  # of a token's lifetime: the latest point before expiry at which a refresh starts
LOCK_TIMEOUT = 30.0  # a worker that dies while refreshing holds the lock no longer than this
WAIT_FOR_TOKEN = 30.0  # after this, a worker refreshes without the lock: a stuck lock must not stop calls
POLL = 0.05
KEEP_FOR = 7 * 24 * 3600  # seconds a server's stored token outlives its last refresh (a server dropped from the config)


@dataclass(frozen=True)
class StoredToken:
    """A token as the fleet shares it: with wall-clock times, since workers on other hosts read it too."""

    token: OAuthToken
    obtained_at: float
    expires_at: float | None

    def due(self, refresh_before: float, now: float) -> bool:
        """Time to fetch the next one."""
        return self.expires_at is not None and now >= self.expires_at - self._margin(refresh_before)

    def usable(self, refresh_before: float, now: float) -> bool:
        """Still worth sending: half the refresh margin is left for it to reach the server and be checked."""
        return self.expires_at is None or now < self.expires_at - self._margin(refresh_before) / 2

    def _margin(self, refresh_before: float) -> float:
        assert self.expires_at is not None
        return min(refresh_before, (self.expires_at - self.obtained_at) * REFRESH_SHARE)


class VaultTokenStorage:
    """The SDK's `TokenStorage` for one server, in the vault: tokens and client information encrypted under
    the key ring and shared by every worker. A record issued to another client (the configuration changed)
    or sealed under a retired key reads as absent, so a new token is fetched."""

    def __init__(self, vault: Vault, server: str, client: str) -> None:
        self.vault = vault
        self.server = server
        self.client = client  # fingerprint of grant, client, issuer and URL
        self.key = f"{vault.namespace}:oauth:{server}"

    def load(self) -> StoredToken | None:
        text = self._read("tokens")
        if text is None:
            return None
        record = json.loads(text)
        if record.get("client") != self.client:
            return None
        return StoredToken(OAuthToken.model_validate(record["token"]), record["obtained_at"], record["expires_at"])

    def save(self, token: OAuthToken) -> StoredToken:
        now = time.time()
        stored = StoredToken(token, now, now + token.expires_in if token.expires_in is not None else None)
        record = {"client": self.client, "token": token.model_dump(mode="json"), "obtained_at": now,
                  "expires_at": stored.expires_at}  # fmt: skip
        self._write("tokens", json.dumps(record))
        return stored

    async def get_tokens(self) -> OAuthToken | None:
        stored = self.load()
        if stored is None or stored.expires_at is None:
            return stored.token if stored else None
        # The SDK counts expiry from when it reads the token: give it the time left, not the original lifetime.
        return stored.token.model_copy(update={"expires_in": max(0, int(stored.expires_at - time.time()))})

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.save(tokens)

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        text = self._read("client")
        return OAuthClientInformationFull.model_validate_json(text) if text else None

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self._write("client", client_info.model_dump_json())

    def clear(self) -> None:
        self.vault.redis.delete(self.key)

    def _read(self, field: str) -> str | None:
        raw = self.vault.redis.hget(self.key, field)
        if raw is None:
            return None
        try:
            return self.vault.unseal(f"the OAuth {field} of MCP server '{self.server}'", as_text(raw))
        except SecretUndecryptable:
            return None  # sealed under a key rotated out since: a token is cheap to fetch again

    def _write(self, field: str, text: str) -> None:
        with self.vault.redis.pipeline() as pipe:
            pipe.hset(self.key, field, self.vault.seal(text))
            pipe.expire(self.key, KEEP_FOR)
            pipe.execute()


class _Unstocked:
    """The storage as a provider about to refresh sees it: no token yet, so the SDK's flow fetches one."""

    def __init__(self, storage: VaultTokenStorage) -> None:
        self._storage = storage

    async def get_tokens(self) -> OAuthToken | None:
        return None

    async def set_tokens(self, tokens: OAuthToken) -> None:
        await self._storage.set_tokens(tokens)

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return await self._storage.get_client_info()

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        await self._storage.set_client_info(client_info)


class FleetOAuth(httpx2.Auth):
    """`httpx2.Auth` for an HTTP MCP server with `auth: {oauth: ...}`: sends the fleet's token from the vault and
    has the SDK's provider fetch the next one, once for the whole fleet, before it expires.

    A 401 to a token that should still be good (revoked, or the server lost its state) also fetches a new one,
    once; if that is refused too, `refusals` names the client, so the caller's error can say which credential.
    """

    requires_response_body = True  # the SDK's flow reads the discovery and token responses

    def __init__(self, server: str, spec: HttpServer, credentials: Credentials) -> None:
        assert spec.oauth is not None
        self.server = server
        self.spec = spec
        self.settings: OAuthSettings = spec.oauth
        self.credentials = credentials
        for name in self.settings.secrets:
            credentials.current(name)  # a missing secret fails the connection now, not its first refresh
        self.storage = VaultTokenStorage(credentials.vault, server, _fingerprint(spec.url, self.settings))
        self._held: StoredToken | None = None
        self.refusals = Refusals()

    def sync_auth_flow(self, request: httpx2.Request) -> Generator[httpx2.Request, httpx2.Response, None]:
        raise RuntimeError("FleetOAuth serves asynchronous HTTP clients only")

    async def async_auth_flow(self, request: httpx2.Request) -> AsyncGenerator[httpx2.Request, httpx2.Response]:
        self._add_secret_headers(request)
        refused: str | None = None
        lock: Lock | None = None
        held = self._current()
        if held is not None and held.usable(self.settings.refresh_before, time.time()):
            lock = self._refresh_lock() if held.due(self.settings.refresh_before, time.time()) else None
            if lock is None:  # not due, or another worker is refreshing it (or just did): send what is held
                response = yield self._authorized(request, self._held or held)
                if response.status_code != 401:
                    return
                refused = (self._held or held).token.access_token
                log.info("MCP server '%s' refused an OAuth token before its expiry; fetching another", self.server)
        found = lock or await self._token_or_lock(refused)
        if isinstance(found, StoredToken):
            self._note((yield self._authorized(request, found)))
            return
        flow = self._refresh(request)
        try:
            outgoing = await flow.__anext__()
            while True:
                outgoing = await flow.asend((yield outgoing))
        except StopAsyncIteration:
            pass
        finally:
            await flow.aclose()
            if found is not None:
                _release(found)

    async def _refresh(self, request: httpx2.Request) -> AsyncGenerator[httpx2.Request, httpx2.Response]:
        """The SDK provider's flow around the request, with the storage showing no token: it fetches one."""
        provider = self._provider()
        flow = provider.async_auth_flow(request)
        try:
            outgoing = await flow.__anext__()
            while True:
                response = yield outgoing
                if outgoing is request:
                    self._note(response)
                outgoing = await flow.asend(response)
        except StopAsyncIteration:
            pass
        except Exception as exc:
            self.refusals.note(f"the OAuth grant of client '{self.settings.client_id}' ({type(exc).__name__})")
            log.warning("MCP server '%s': OAuth flow failed: %s", self.server, type(exc).__name__)
            raise
        finally:
            await flow.aclose()
        self._held = self.storage.load()
        if self._held is not None:
            lifetime = self._held.token.expires_in
            log.info("MCP server '%s': new OAuth token for the fleet (expires in %s s)", self.server, lifetime)

    def _current(self) -> StoredToken | None:
        """The token this process holds, read from the vault again once it falls due (another may be there)."""
        if self._held is None or self._held.due(self.settings.refresh_before, time.time()):
            self._held = self.storage.load()
        return self._held

    def _fresh(self, refused: str | None) -> StoredToken | None:
        """A stored token not yet due, other than the one the server refused."""
        stored = self.storage.load()
        if stored is None or stored.due(self.settings.refresh_before, time.time()):
            return None
        return None if stored.token.access_token == refused else stored

    async def _token_or_lock(self, refused: str | None) -> StoredToken | Lock | None:
        """A fresh token another worker stored, or the refresh lock; None when neither came in time."""
        deadline = time.monotonic() + WAIT_FOR_TOKEN
        while time.monotonic() < deadline:
            if (stored := self._fresh(refused)) is not None:
                self._held = stored
                return stored
            if (lock := self._try_lock()) is not None:
                if (stored := self._fresh(refused)) is None:  # or stored between the read above and the lock
                    return lock
                _release(lock)
                self._held = stored
                return stored
            await anyio.sleep(POLL)
        log.warning("MCP server '%s': no OAuth token stored within %s s; refreshing without the lock", self.server,
                    WAIT_FOR_TOKEN)  # fmt: skip
        return None

    def _refresh_lock(self) -> Lock | None:
        """The refresh lock when this worker is the one to refresh: nobody holds it and nobody just refreshed."""
        lock = self._try_lock()
        if lock is not None and (stored := self._fresh(None)) is not None:
            _release(lock)
            self._held = stored
            return None
        return lock

    def _try_lock(self) -> Lock | None:
        # thread_local=False: the coroutines of one event loop share a thread, each acquisition has its own lock
        lock = Lock(self.storage.vault.redis, f"{self.storage.key}:lock", timeout=LOCK_TIMEOUT, thread_local=False)
        return lock if lock.acquire(blocking=False) else None

    def _authorized(self, request: httpx2.Request, stored: StoredToken) -> httpx2.Request:
        request.headers["Authorization"] = f"Bearer {stored.token.access_token}"
        return request

    def _note(self, response: httpx2.Response) -> None:
        status = response.status_code
        if status in (401, 403):
            self.refusals.note(f"the OAuth token of client '{self.settings.client_id}' (HTTP {status})")

    def _add_secret_headers(self, request: httpx2.Request) -> None:
        for header, (secret, prefix) in self.spec.secret_headers.items():
            request.headers[header] = f"{prefix}{self.credentials.current(secret)[1]}"

    def _provider(self) -> httpx2.Auth:
        settings, storage = self.settings, _Unstocked(self.storage)
        scope = " ".join(settings.scopes) or None
        if settings.grant == "client_credentials":
            return ClientCredentialsOAuthProvider(
                self.spec.url, storage, settings.client_id, self._secret(settings.client_secret),
                settings.token_endpoint_auth_method, scope, settings.issuer,
            )  # fmt: skip
        if settings.grant == "private_key_jwt":
            return PrivateKeyJWTOAuthProvider(
                self.spec.url, storage, settings.client_id, self._client_assertion(), scope, settings.issuer
            )
        return IdentityAssertionOAuthProvider(
            self.spec.url, storage, settings.client_id, self._secret(settings.client_secret), settings.issuer,
            self._identity_assertion, scope, settings.token_endpoint_auth_method,
        )  # fmt: skip

    def _client_assertion(self) -> Callable[[str], Awaitable[str]]:
        """private_key_jwt: a JWT signed here with the vault's key, or one obtained elsewhere and kept there."""
        settings = self.settings
        if settings.private_key is not None:
            signer = SignedJWTParameters(
                issuer=settings.client_id, subject=settings.client_id,
                signing_key=self._secret(settings.private_key), signing_algorithm=settings.algorithm,
            )  # fmt: skip
            return signer.create_assertion_provider()

        async def stored(audience: str) -> str:
            return self._secret(settings.assertion)

        return stored

    async def _identity_assertion(self, audience: str, resource: str) -> str:
        # The ID-JAG comes from the enterprise IdP by a deployment's own means (SEP-990 leg 1), which keeps the
        # current one in the vault; it is read at each exchange so a renewed one is used at once.
        return self._secret(self.settings.assertion)

    def _secret(self, ref: SecretRef | None) -> str:
        assert ref is not None  # OAuthSettings checks that the grant has its credentials
        return self.credentials.current(ref.secret, read_after=time.monotonic())[1]


def _release(lock: Lock) -> None:
    try:
        lock.release()
    except Exception:  # expired and taken by another worker meanwhile: nothing of ours to release
        log.debug("OAuth refresh lock was already gone", exc_info=True)


def _fingerprint(url: str, settings: OAuthSettings) -> str:
    """Which client a stored token was issued to, so a changed configuration does not reuse it."""
    parts = [url, settings.grant, settings.client_id, settings.issuer, " ".join(settings.scopes)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
