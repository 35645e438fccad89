"""OAuth 2.1 for HTTP MCP servers: the configuration, the vault's token storage, and a long run across two
worker processes against a real authorization server issuing 3-second tokens and a real MCP server checking
them, where the fleet asks for about one token per expiry, not one per worker."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import jwt
import pytest
import yaml
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from mcp.shared.auth import OAuthToken
from redis import Redis

from orchestrator import Orchestrator, Workflow, load_config
from orchestrator.config import HttpServer, parse_config
from orchestrator.errors import ConfigError
from orchestrator.security.vault import KeyRing, Vault
from workers.app import app, queue_for
from workers.credentials import Credentials
from workers.oauth import REFRESH_SHARE, StoredToken, VaultTokenStorage
from workers.sessions import Connection

from .conftest import SERVERS, WorkerProcesses, free_port, vault_home, wait_for_port
from .test_vault import canary, no_failed_call, redis_values

LIFETIME = 3  # seconds an access token lives


def oauth_server(**oauth: Any) -> dict[str, Any]:
    return {"servers": {"api": {"url": "https://mcp.example.com/mcp", "auth": {"oauth": oauth}}}}


ISSUER = "https://auth.example.com"


@pytest.mark.parametrize(
    "oauth",
    [
        {"grant": "client_credentials", "client_secret": {"secret": "api-secret"}, "scopes": ["mcp", "read"]},
        {"grant": "private_key_jwt", "private_key": {"secret": "api-key"}, "algorithm": "ES256"},
        {"grant": "private_key_jwt", "assertion": {"secret": "workload-jwt"}},
        {"grant": "identity_assertion", "client_secret": {"secret": "api-secret"}, "assertion": {"secret": "id-jag"}},
    ],
)
def test_each_grant_is_configured_with_its_credentials(oauth: dict[str, Any]) -> None:
    config = parse_config(oauth_server(client_id="fleet", issuer=ISSUER, **oauth))
    spec = config.servers["api"]
    assert isinstance(spec, HttpServer) and spec.oauth is not None
    assert spec.oauth.secrets and not spec.secret_headers  # the token is no vault secret header


@pytest.mark.parametrize(
    ("oauth", "message"),
    [
        ({"grant": "client_credentials"}, "grant 'client_credentials' takes client_secret"),
        ({"grant": "private_key_jwt", "client_secret": {"secret": "s"}}, "takes private_key or assertion"),
        ({"grant": "private_key_jwt", "private_key": {"secret": "k"}, "assertion": {"secret": "a"}}, "no other"),
        ({"grant": "identity_assertion", "client_secret": {"secret": "s"}}, "takes assertion and client_secret"),
        ({"grant": "password", "client_secret": {"secret": "s"}}, "auth.oauth.grant"),
        ({"grant": "client_credentials", "client_secret": "plain"}, "client_secret"),
    ],
)
def test_a_grant_without_its_credentials_is_a_clear_error(oauth: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(oauth_server(client_id="fleet", issuer=ISSUER, **oauth))


def test_oauth_needs_an_issuer_and_excludes_bearer() -> None:
    with pytest.raises(ConfigError, match="issuer"):
        parse_config(oauth_server(grant="client_credentials", client_id="c", client_secret={"secret": "s"}))
    both = {"bearer": {"secret": "t"}, "oauth": {"grant": "client_credentials", "client_id": "c",
                                                 "client_secret": {"secret": "s"}, "issuer": ISSUER}}  # fmt: skip
    with pytest.raises(ConfigError, match="give 'bearer' or 'oauth', exactly one of them"):
        parse_config({"servers": {"api": {"url": "https://mcp.example.com/mcp", "auth": both}}})


@pytest.fixture
def vault(redis_url: str, tmp_path: Path) -> Iterator[Vault]:
    ring = KeyRing(path=tmp_path / "vault.keys")
    ring.ensure()
    vault = Vault(Redis.from_url(redis_url), f"oauth-test-{uuid.uuid4().hex[:8]}", ring)
    yield vault
    for key in vault.redis.scan_iter(f"{vault.namespace}:*"):
        vault.redis.delete(key)


def test_tokens_are_sealed_in_the_vault_and_shared_by_every_reader(vault: Vault) -> None:
    token = canary()
    writer, reader = VaultTokenStorage(vault, "api", "client-a"), VaultTokenStorage(vault, "api", "client-a")
    asyncio.run(writer.set_tokens(OAuthToken(access_token=token, expires_in=3600)))
    assert not any(token.encode() in blob for blob in redis_values(vault.redis, writer.key.encode()))
    read = asyncio.run(reader.get_tokens())
    assert read is not None and read.access_token == token and read.expires_in is not None
    assert 3590 <= read.expires_in <= 3600  # the time left, for the SDK to count from when it reads it
    assert asyncio.run(VaultTokenStorage(vault, "api", "client-b").get_tokens()) is None  # issued to another client


def test_a_token_sealed_under_a_retired_key_reads_as_absent(vault: Vault) -> None:
    storage = VaultTokenStorage(vault, "api", "client-a")
    asyncio.run(storage.set_tokens(OAuthToken(access_token=canary(), expires_in=60)))
    assert asyncio.run(storage.get_tokens()) is not None
    vault.ring.write([Fernet.generate_key()])  # the key it was sealed under is gone: fetch a new token
    assert (
        asyncio.run(VaultTokenStorage(Vault(vault.redis, vault.namespace, vault.ring), "api", "c").get_tokens()) is None
    )


def test_a_token_falls_due_before_it_expires_and_is_sent_until_shortly_before() -> None:
    token = StoredToken(OAuthToken(access_token="t", expires_in=LIFETIME), 1000.0, 1000.0 + LIFETIME)
    margin = LIFETIME * REFRESH_SHARE  # refresh_before (60 s) is longer than a quarter of 3 s
    assert not token.due(60, 1000 + LIFETIME - margin - 0.01) and token.due(60, 1000 + LIFETIME - margin)
    assert token.usable(60, 1000 + LIFETIME - margin / 2 - 0.01) and not token.usable(60, 1000 + LIFETIME - margin / 2)
    hour = StoredToken(OAuthToken(access_token="t", expires_in=3600), 0.0, 3600.0)
    assert not hour.due(60, 3539) and hour.due(60, 3540)


@dataclass
class Authorization:
    """The authorization server and the MCP server it protects, with the client's credentials."""

    issuer: str
    url: str
    secret: str
    private_key: str  # PEM; the issuer trusts its public half for client assertions and identity assertions

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = httpx2.get(f"{self.issuer}/stats").json()
        return result

    def identity_assertion(self) -> str:
        """An ID-JAG as an enterprise IdP would issue it for this MCP server (SEP-990 leg 1)."""
        now = int(time.time())
        claims = {"iss": "https://idp.example.com", "sub": "alice", "aud": self.issuer, "client_id": "fleet",
                  "resource": self.url, "iat": now, "exp": now + 600, "jti": uuid.uuid4().hex}  # fmt: skip
        return jwt.encode(claims, self.private_key, algorithm="RS256")


@pytest.fixture(scope="module")
def authorization(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Authorization]:
    home = tmp_path_factory.mktemp("oauth-servers")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode()
    (home / "public.pem").write_bytes(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    secret = canary()
    (home / "secret").write_text(secret)
    issuer_port, server_port = free_port(), free_port()
    issuer = f"http://127.0.0.1:{issuer_port}"
    servers = [
        subprocess.Popen([sys.executable, str(SERVERS / "issuer.py"), "--port", str(issuer_port), "--client-id",
                          "fleet", "--secret-file", str(home / "secret"), "--lifetime", str(LIFETIME),
                          "--public-key", str(home / "public.pem")]),
        subprocess.Popen([sys.executable, str(SERVERS / "protected.py"), "--port", str(server_port),
                          "--issuer", issuer]),
    ]  # fmt: skip
    wait_for_port(issuer_port)
    wait_for_port(server_port)
    yield Authorization(issuer, f"http://127.0.0.1:{server_port}/mcp", secret, private)
    for server in servers:
        server.terminate()
        server.wait(10)


GRANTS = {
    "client_credentials": ({"client_secret": {"secret": "client-secret"}}, "client_credentials client_secret"),
    "private_key_jwt": ({"private_key": {"secret": "client-key"}}, "client_credentials private_key_jwt"),
    "identity_assertion": (
        {"client_secret": {"secret": "client-secret"}, "assertion": {"secret": "id-jag"}},
        "urn:ietf:params:oauth:grant-type:jwt-bearer client_secret",
    ),
}


@pytest.mark.parametrize("grant", sorted(GRANTS))
def test_each_grant_gets_one_token_for_two_connections_through_the_sdk(
    grant: str, authorization: Authorization, vault: Vault
) -> None:
    vault.set("client-secret", authorization.secret)
    vault.set("client-key", authorization.private_key)
    vault.set("id-jag", authorization.identity_assertion())
    credentials, expected = GRANTS[grant]
    oauth = {"grant": grant, "client_id": "fleet", "issuer": authorization.issuer, **credentials}
    spec = parse_config({"servers": {"p": {"url": authorization.url, "auth": {"oauth": oauth}}}}).servers["p"]
    before = authorization.stats()["grants"]
    # Two connections with their own FleetOAuth, as two workers would have: the second finds the first's token.
    answers = asyncio.run(call_each(spec, Credentials(vault), Credentials(vault)))
    assert [answer["value"] for answer in answers] == [0, 1]
    after = authorization.stats()["grants"]
    assert {name: count - before.get(name, 0) for name, count in after.items() if count != before.get(name, 0)} == {
        expected: 1
    }


async def call_each(spec: Any, *credentials: Credentials) -> list[dict[str, Any]]:
    answers = []
    for number, each in enumerate(credentials):
        connection = Connection("p", spec, sys.stderr, each)
        try:
            async with connection.use() as (client, _):
                result = await client.call_tool("echo", {"value": number})
                assert not result.is_error, result
                answers.append(json.loads(result.content[0].text))  # type: ignore[union-attr]
        finally:
            await connection.close()
    return answers


@dataclass
class OAuthFleet:
    orch: Orchestrator
    vault: Vault
    issuer: str
    secret: str
    logs: list[Path]
    worker_logs: list[Path]

    def stats(self) -> dict[str, int]:
        result: dict[str, int] = httpx2.get(f"{self.issuer}/stats").json()
        return result

    def run(self, width: int, tool: str = "sleep", **parameters: Any) -> Any:
        steps = [{"id": f"call-{i}", "service": "protected", "tool": tool, "parameters": parameters,
                  "depends_on": []} for i in range(width)]  # fmt: skip
        return self.orch.enqueue(Workflow.model_validate({"id": f"oauth-{width}", "steps": steps}))


def wait_for_workers(queue: str, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        replies = app.control.inspect(timeout=0.5).active_queues() or {}
        if sum(any(q["name"] == queue for q in queues) for queues in replies.values()) >= count:
            return
    raise RuntimeError(f"fewer than {count} workers serve {queue} after {timeout} s")


@pytest.fixture(scope="module")
def fleet(redis_url: str, workers: WorkerProcesses, worker_env: dict[str, str], authorization: Authorization,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[OAuthFleet]:  # fmt: skip
    home = vault_home(tmp_path_factory.mktemp("oauth-fleet"), redis_url, worker_env)
    home.vault.set("oauth-client-secret", authorization.secret)
    oauth = {"grant": "client_credentials", "client_id": "fleet", "issuer": authorization.issuer,
             "client_secret": {"secret": "oauth-client-secret"}}  # fmt: skip
    config = {
        "servers": {"protected": {"url": authorization.url, "auth": {"oauth": oauth}}},
        "services": {"protected": {"server": "protected", "retries": 0}},
    }
    path = home.path / "oauth.yaml"
    path.write_text(yaml.safe_dump(config))
    VaultTokenStorage(home.vault, "protected", "").clear()
    pool = WorkerProcesses(home.env, workers.log_dir)
    pool.start_each([("protected",), ("protected",)], config=path, concurrency=20)
    wait_for_workers(queue_for("protected"), 2)
    logs = [workers.log_dir, Path(home.env["MCPO_HOME"]) / "logs"]
    worker_logs = [pool.log_dir / f"worker-protected-{n}.log" for n in range(2)]
    with Orchestrator(load_config(path), redis_url=redis_url) as orchestrator:
        yield OAuthFleet(orchestrator, home.vault, authorization.issuer, authorization.secret, logs, worker_logs)
    pool.stop()
    VaultTokenStorage(home.vault, "protected", "").clear()
    home.vault.remove("oauth-client-secret")  # sealed under this module's key ring, which later tests do not hold


def test_a_long_run_across_two_workers_asks_for_one_token_per_expiry(fleet: OAuthFleet) -> None:
    before, refused = fleet.stats()["token_requests"], fleet.stats()["refused"]
    started = time.monotonic()
    runs = 0
    while time.monotonic() - started < 5 * LIFETIME:  # outlives several tokens
        no_failed_call(fleet.run(40, seconds=0.2).wait(60))
        runs += 1
    elapsed = time.monotonic() - started
    requests = fleet.stats()["token_requests"] - before
    # A token is refreshed when a quarter of its life is left: one request per three quarters of a lifetime,
    # plus the first. One per worker per expiry would be twice as many.
    expected = elapsed / (LIFETIME * (1 - REFRESH_SHARE)) + 1
    assert runs >= 5
    assert 4 <= requests <= expected + 1, (requests, expected)
    assert fleet.stats()["refused"] == refused
    assert all(b"received" in log.read_bytes() for log in fleet.worker_logs)  # both workers took calls


def test_a_token_refused_before_its_expiry_is_replaced_once_for_the_fleet(fleet: OAuthFleet) -> None:
    no_failed_call(fleet.run(10, seconds=0.05).wait(30))
    before = fleet.stats()["token_requests"]
    httpx2.post(f"{fleet.issuer}/forget")  # revokes every token issued, mid-lifetime
    no_failed_call(fleet.run(40, seconds=0.05).wait(30))
    assert 1 <= fleet.stats()["token_requests"] - before <= 2


def test_no_token_or_client_secret_in_redis_or_the_logs(fleet: OAuthFleet, redis_url: str) -> None:
    no_failed_call(fleet.run(5, tool="echo", value="canary check").wait(30))
    redis = Redis.from_url(redis_url)
    sealed = redis.hget(f"{fleet.vault.namespace}:oauth:protected", "tokens")
    assert sealed
    access = json.loads(fleet.vault.unseal("the stored token", sealed.decode()))["token"]["access_token"]
    blobs = [blob for key in redis.scan_iter(count=1000) for blob in [key, *redis_values(redis, key)]]
    logs = [path.read_bytes() for folder in fleet.logs for path in folder.glob("*.log")]
    for value in (fleet.secret, access):
        assert not any(value.encode() in blob for blob in blobs), "a credential is in Redis"
        assert not any(value.encode() in log for log in logs), "a credential is in a log"
