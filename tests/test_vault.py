"""The credential vault: encryption at rest, key rotation, config references, the CLI, and rotation under load
with real worker processes, a real HTTP MCP server that requires a bearer token and a real stdio server."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
import yaml
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from redis import Redis
from sqlalchemy import select

from orchestrator import Orchestrator, RunResult, Workflow, load_config
from orchestrator.config import parse_config
from orchestrator.errors import ConfigError, KeyRingMissing, SecretNotFound, SecretUndecryptable, VaultError
from orchestrator.history import audit, events
from orchestrator.history.flusher import Flusher
from orchestrator.history.records import RecordStore
from orchestrator.history.tables import AuditRecord
from orchestrator.security.events import off_security_event, on_security_event
from orchestrator.security.vault import KEEP_VERSIONS, KeyRing, Vault
from workers.credentials import Credentials, SecretAuth

from .conftest import ROOT, SERVERS, BearerServer, RecordsDatabase, WorkerProcesses, vault_home


def canary() -> str:
    return f"canary-{uuid.uuid4().hex}"


@pytest.fixture
def vault(redis_url: str, tmp_path: Path) -> Iterator[Vault]:
    """A vault of its own namespace, its key ring in a fresh key file."""
    ring = KeyRing(path=tmp_path / "vault.keys")
    ring.ensure()
    redis = Redis.from_url(redis_url)
    vault = Vault(redis, f"vault-test-{uuid.uuid4().hex[:8]}", ring)
    yield vault
    redis.delete(vault.key)
    redis.close()


def stored(vault: Vault) -> dict[str, Any]:
    """The vault's hash in Redis, as raw text."""
    return {k.decode(): v.decode() for k, v in vault.redis.hgetall(vault.key).items()}


def test_set_get_versions_list_and_rm(vault: Vault) -> None:
    first, second = canary(), canary()
    assert vault.set("github-token", first) == 1
    assert vault.set("github-token", second) == 2
    assert vault.get("github-token") == second
    assert vault.get("github-token", 1) == first
    assert vault.current("github-token") == (2, second)
    assert vault.versions(["github-token", "absent"]) == {"github-token": 2, "absent": 0}
    (info,) = vault.list()
    assert (info.name, info.version, info.versions) == ("github-token", 2, [1, 2])
    assert info.updated_at >= info.created_at
    assert vault.remove("github-token") and not vault.remove("github-token")
    with pytest.raises(SecretNotFound, match="no secret 'github-token'") as caught:
        vault.get("github-token")
    assert first not in str(caught.value) and second not in str(caught.value)


def test_only_the_last_versions_are_kept(vault: Vault) -> None:
    for _ in range(KEEP_VERSIONS + 2):
        vault.set("api-key", canary())
    assert vault.list()[0].versions == list(range(3, KEEP_VERSIONS + 3))
    with pytest.raises(SecretNotFound, match="secret 'api-key' has no version 1"):
        vault.get("api-key", 1)


def test_ciphertext_in_redis_never_holds_the_plaintext(vault: Vault) -> None:
    value = canary()
    vault.set("api-key", value)
    raw = stored(vault)["api-key"]
    assert value not in raw and value.encode().hex() not in raw
    assert Fernet(vault.ring.load()[0]).decrypt(yaml.safe_load(raw)["versions"]["1"]["token"]).decode() == value


def test_bad_names_and_empty_values_are_refused(vault: Vault) -> None:
    with pytest.raises(VaultError, match="invalid secret name"):
        vault.set("no spaces", "x")
    with pytest.raises(VaultError, match="secret 'empty': the value is empty"):
        vault.set("empty", "")


def test_rotate_keys_re_encrypts_every_version_and_retires_the_old_key(vault: Vault) -> None:
    values = {"a": [canary(), canary()], "b": [canary()]}
    for name, versions in values.items():
        for value in versions:
            vault.set(name, value)
    old_keys = vault.ring.load()
    old_ring = MultiFernet([Fernet(key) for key in old_keys])
    rotation = vault.rotate_keys()
    assert (rotation.secrets, rotation.ciphertexts, rotation.retired) == (2, 3, 1)
    new_keys = vault.ring.load()
    assert len(new_keys) == 1 and new_keys[0] not in old_keys
    for name, versions in values.items():
        for number, value in enumerate(versions, 1):
            token = yaml.safe_load(stored(vault)[name])["versions"][str(number)]["token"].encode()
            assert Fernet(new_keys[0]).decrypt(token).decode() == value
            with pytest.raises(InvalidToken):
                old_ring.decrypt(token)
    assert stat.S_IMODE(vault.ring.path.stat().st_mode) == 0o600  # type: ignore[union-attr]


def test_a_reader_holding_the_old_ring_rereads_the_key_file(vault: Vault) -> None:
    reader = Vault(vault.redis, vault.key.removesuffix(":vault"), KeyRing(path=vault.ring.path))
    value = canary()
    vault.set("token", value)
    assert reader.get("token") == value  # the reader now holds the ring with only the first key
    vault.rotate_keys()
    assert reader.get("token") == value


def test_a_missing_key_ring_is_a_clear_error(redis_url: str, tmp_path: Path) -> None:
    path = tmp_path / "absent.keys"
    vault = Vault(Redis.from_url(redis_url), f"vault-test-{uuid.uuid4().hex[:8]}", KeyRing(path=path))
    with pytest.raises(KeyRingMissing, match=f"no vault key ring: set MCPO_VAULT_KEYS or create the key file {path}"):
        vault.set("token", "value")
    assert KeyRing(path=path).ensure() and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not KeyRing(path=path).ensure()  # an existing ring is kept
    with pytest.raises(KeyRingMissing, match=r"key 1 of the vault key ring \(MCPO_VAULT_KEYS\) is not a Fernet key"):
        KeyRing(keys=[b"not-a-key"]).fernet()


def test_a_foreign_ring_cannot_decrypt_and_says_which_secret(vault: Vault) -> None:
    value = canary()
    vault.set("token", value)
    stranger = Vault(vault.redis, vault.key.removesuffix(":vault"), KeyRing(keys=[Fernet.generate_key()]))
    with pytest.raises(SecretUndecryptable, match="secret 'token' does not decrypt") as caught:
        stranger.get("token")
    assert value not in str(caught.value)


def test_config_references_secrets_by_name_and_keeps_plain_strings() -> None:
    config = parse_config({"servers": {
        "api": {"url": "http://127.0.0.1:1/mcp", "headers": {"X-Api-Key": {"secret": "api-key"}, "X-Team": "infra"},
                "auth": {"bearer": {"secret": "github-token"}}},
        "tool": {"command": "python", "env": {"TOKEN": {"secret": "tool-token"}, "MODE": "fast"}},
    }})  # fmt: skip
    api, tool = config.servers["api"], config.servers["tool"]
    assert api.secret_headers == {"X-Api-Key": ("api-key", ""), "Authorization": ("github-token", "Bearer ")}
    assert api.plain_headers == {"X-Team": "infra"}
    assert tool.secrets == ["tool-token"]
    with pytest.raises(ConfigError, match=r"servers\.tool\.env\.TOKEN\.secret"):
        parse_config({"servers": {"tool": {"command": "x", "env": {"TOKEN": {"secret": "no spaces"}}}}})


def audited(redis: Redis, namespace: str, database: RecordsDatabase, *actions: str) -> list[AuditRecord]:
    """The audit rows of those actions whose detail names the namespace, once its records buffer is written;
    the chain must hold."""
    store = RecordStore(database.url)
    Flusher(redis, namespace, store).flush(60)
    with store.session() as session:
        assert audit.verify(session)[1] is None
        rows = session.scalars(select(AuditRecord).where(AuditRecord.action.in_(actions)).order_by(AuditRecord.seq))
        found = [row for row in rows if f'"namespace":"{namespace}"' in (row.detail or "")]
    store.close()
    return found


def test_a_worker_reports_each_version_of_a_secret_it_reads_once(vault: Vault) -> None:
    heard: list[tuple[str, dict[str, Any]]] = []

    def listener(kind: str, subject: str, detail: dict[str, Any]) -> None:
        if kind == "secret-read" and detail.get("namespace") == vault.namespace:
            heard.append((subject, detail))

    first, second = canary(), canary()
    on_security_event(listener)
    try:
        vault.set("api-key", first)
        credentials = Credentials(vault, fresh_for=0)  # every call reads the vault, as once a second would
        for _ in range(5):
            credentials.current("api-key")
        vault.set("api-key", second)
        for _ in range(5):
            credentials.current("api-key")
        Credentials(vault, fresh_for=0).current("api-key")  # another process reports its own first read
    finally:
        off_security_event(listener)
    assert [(detail["secret"], detail["version"]) for _, detail in heard] == [("api-key", 1), ("api-key", 2),
                                                                                ("api-key", 2)]  # fmt: skip
    host = socket.gethostname()
    assert {subject for subject, _ in heard} == {f"worker:{host}"} and heard[0][1]["worker"] == host
    assert first not in repr(heard) and second not in repr(heard)


def cli(env: dict[str, str], *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=env, cwd=ROOT, input=stdin,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_a_refusal_stays_named_for_its_caller_when_a_concurrent_request_succeeds(vault: Vault) -> None:
    vault.set("bearer-token", "refused-token")
    auth = SecretAuth("bearer", {"Authorization": ("bearer-token", "Bearer ")}, Credentials(vault))

    def server(request: httpx2.Request) -> httpx2.Response:
        accepted = request.headers["Authorization"] == "Bearer accepted-token"
        return httpx2.Response(200 if accepted else 401)

    async def two_requests() -> list[int]:
        async with httpx2.AsyncClient(transport=httpx2.MockTransport(server), auth=auth) as http:
            refused = await http.post("http://bearer/mcp", content=b"{}")
            vault.set("bearer-token", "accepted-token")
            accepted = await http.post("http://bearer/mcp", content=b"{}")
        return [refused.status_code, accepted.status_code]

    started = time.monotonic()
    assert asyncio.run(two_requests()) == [401, 200]
    assert auth.refusals.since(started) == "secret 'bearer-token' version 1 (HTTP 401)"
    assert auth.refusals.since(time.monotonic()) is None


def test_cli_secrets_and_keys_never_show_a_value(redis_url: str, tmp_path: Path,
                                                records_database: RecordsDatabase) -> None:  # fmt: skip
    env = {**os.environ, "REDIS_URL": redis_url, "MCPO_NAMESPACE": f"vault-cli-{uuid.uuid4().hex[:8]}",
           "MCPO_VAULT_KEY_FILE": str(tmp_path / "keys" / "vault.keys")}  # fmt: skip
    first, second = canary(), canary()
    created = cli(env, "secrets", "set", "github-token", stdin=f"{first}\n")
    assert created.returncode == 0, created.stderr
    assert "created a new vault key ring in" in created.stderr and "version 1 set" in created.stdout
    (tmp_path / "value").write_text(second)
    again = cli(env, "secrets", "set", "github-token", "--from-file", str(tmp_path / "value"))
    assert again.returncode == 0 and "version 2 set" in again.stdout and "created" not in again.stderr
    listed = cli(env, "secrets", "list")
    assert listed.returncode == 0 and "github-token" in listed.stdout and " 2 " in listed.stdout
    rotated = cli(env, "keys", "rotate")
    assert rotated.returncode == 0 and "re-encrypted 2 ciphertexts of 1 secrets; retired 1 old key(s)" in rotated.stdout
    ring = KeyRing(path=tmp_path / "keys" / "vault.keys")
    vault = Vault(Redis.from_url(redis_url), env["MCPO_NAMESPACE"], ring)
    assert vault.get("github-token") == second
    removed, missing = cli(env, "secrets", "rm", "github-token"), cli(env, "secrets", "rm", "github-token")
    assert removed.returncode == 0 and missing.returncode == 2 and "no secret 'github-token'" in missing.stderr
    outputs = [created, again, listed, rotated, removed, missing]
    assert not any(value in run.stdout + run.stderr for run in outputs for value in (first, second))
    no_ring = cli({**env, "MCPO_VAULT_KEY_FILE": str(tmp_path / "nowhere.keys")}, "keys", "rotate")
    assert no_ring.returncode == 1 and "no vault key ring" in no_ring.stderr
    # Each change is a security event on the audit chain, under the OS user (access control is off here).
    rows = audited(vault.redis, env["MCPO_NAMESPACE"], records_database, "secret-set", "secret-removed", "keys-rotated")
    assert [(row.action, row.who) for row in rows] == [
        ("secret-set", events.caller()), ("secret-set", events.caller()), ("keys-rotated", events.caller()),
        ("secret-removed", events.caller()),
    ]  # fmt: skip
    details = [json.loads(row.detail or "{}") for row in rows]
    assert [(d.get("secret"), d.get("version")) for d in details] == [
        ("github-token", 1), ("github-token", 2), (None, None), ("github-token", None)
    ]  # fmt: skip
    assert details[2]["secrets"] == 1 and details[2]["retired"] == 1
    assert not any(value in (row.detail or "") for row in rows for value in (first, second))


@dataclass
class Fleet:
    """Worker processes over a bearer-token HTTP server and a stdio server whose env carries secrets."""

    orch: Orchestrator
    vault: Vault
    tokens: Path
    env: dict[str, str]
    logs: list[Path]
    canaries: list[str]

    def accept(self, *tokens: str) -> None:
        """The tokens the HTTP server accepts from its next request on (replaced whole: it never reads half)."""
        staged = self.tokens.with_suffix(".staged")
        staged.write_text("".join(f"{token}\n" for token in tokens))
        staged.replace(self.tokens)

    def rotate_token(self, grace: bool = False) -> str:
        """A new bearer token in the vault; with grace, the server takes the old and the new one meanwhile."""
        token = canary()
        if grace:
            self.accept(self.vault.current("bearer-token")[1], token)
        self.canaries.append(token)
        self.vault.set("bearer-token", token)
        return token

    def run(self, service: str, tool: str, width: int, **parameters: Any) -> Any:
        step = {"service": service, "tool": tool, "parameters": parameters, "depends_on": []}
        steps = [{**step, "id": f"{service}-{i}"} for i in range(width)]
        return self.orch.enqueue(Workflow.model_validate({"id": f"{service}-{width}", "steps": steps}))

    def finished(self, run_id: str) -> int:
        steps = self.orch.status(run_id).steps.values()
        return sum(step.status in ("succeeded", "failed") for step in steps)

    def wait_until_finished(self, run_id: str, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.finished(run_id) < count:
            assert time.monotonic() < deadline, f"fewer than {count} steps of run {run_id} finished in {timeout} s"
            time.sleep(0.1)


def no_failed_call(result: RunResult) -> None:
    failed = {sid: (s.status, s.attempts, s.error) for sid, s in result.steps.items()
              if s.status != "succeeded" or s.attempts != 1}  # fmt: skip
    assert result.status == "succeeded" and not failed, list(failed.items())[:5]


@pytest.fixture(scope="module")
def fleet(redis_url: str, workers: WorkerProcesses, worker_env: dict[str, str],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:  # fmt: skip
    home = vault_home(tmp_path_factory.mktemp("vault-fleet"), redis_url, worker_env)
    canaries = [canary(), canary()]
    home.vault.set("bearer-token", canaries[0])
    home.vault.set("stdio-canary", canaries[1])
    home.vault.set("stdio-value", "first value")
    server = BearerServer(home.path / "tokens", canaries[0])
    config = {
        "servers": {
            "bearer": {"url": server.url, "auth": {"bearer": {"secret": "bearer-token"}}},
            "envy": {"command": "python", "args": [str(SERVERS / "testing.py")],
                     "env": {"VAULT_VALUE": {"secret": "stdio-value"}, "VAULT_CANARY": {"secret": "stdio-canary"}}},
        },
        "services": {"bearer": {"server": "bearer", "retries": 0}, "envy": {"server": "envy", "retries": 0}},
    }  # fmt: skip
    path = home.path / "vault.yaml"
    path.write_text(yaml.safe_dump(config))
    pool = WorkerProcesses(home.env, workers.log_dir)
    pool.start("bearer", "envy", config=path)
    logs = [workers.log_dir, Path(home.env["MCPO_HOME"]) / "logs"]
    with Orchestrator(load_config(path), redis_url=redis_url) as orchestrator:
        yield Fleet(orchestrator, home.vault, server.tokens, home.env, logs, canaries)
    pool.stop()
    server.stop()
    for name in ("bearer-token", "stdio-canary", "stdio-value"):  # sealed under this module's ring: a later
        home.vault.remove(name, None)  # `keys rotate` under the session's ring could not open them


def test_http_token_rotation_during_a_1000_call_fanout_fails_no_call(fleet: Fleet) -> None:
    width = 1000
    run = fleet.run("bearer", "sleep", width, seconds=0.05)
    fleet.wait_until_finished(run.id, 100)
    new = fleet.rotate_token(grace=True)
    time.sleep(2.5)  # longer than a worker caches a secret
    fleet.accept(new)
    assert fleet.finished(run.id) < width, "the fan-out ended before the old token was refused: make it longer"
    no_failed_call(run.wait(120))
    no_failed_call(fleet.run("bearer", "echo", 5, value="after").wait(30))


def test_a_refused_token_is_refreshed_once_then_named_in_the_error(fleet: Fleet) -> None:
    token = fleet.rotate_token()  # the server learns it only after the workers cached the old one
    fleet.accept(token)
    no_failed_call(fleet.run("bearer", "echo", 3, value="refreshed").wait(30))
    fleet.accept("nobody-has-this-token")
    result = fleet.run("bearer", "echo", 1, value="refused").wait(30)
    (step,) = result.steps.values()
    assert step.status == "failed" and step.error_type == "CredentialRejected", step.error
    assert "refused secret 'bearer-token' version" in (step.error or "") and "(HTTP 401)" in (step.error or "")
    assert token not in (step.error or "")
    fleet.accept(token)


def test_keys_rotate_during_a_run_fails_no_call_and_retires_the_old_key(fleet: Fleet) -> None:
    old_ring = fleet.vault.ring.fernet()
    run = fleet.run("bearer", "sleep", 1000, seconds=0.05)
    fleet.wait_until_finished(run.id, 100)
    fleet.vault.rotate_keys()  # what `keys rotate` does (the CLI test runs it), without a process start's delay
    token = fleet.rotate_token(grace=True)  # written under the new key: workers must read the new ring to send it
    time.sleep(2.5)  # longer than a worker caches a secret
    fleet.accept(token)
    assert fleet.finished(run.id) < 1000, "the run ended before the rotation: make it longer"
    no_failed_call(run.wait(120))
    no_failed_call(fleet.run("bearer", "echo", 5, value="new ring").wait(30))
    no_failed_call(fleet.run("envy", "echo", 1).wait(30))
    new_ring = fleet.vault.ring.fernet()
    for name, raw in stored(fleet.vault).items():
        for version in yaml.safe_load(raw)["versions"].values():
            assert new_ring.decrypt(version["token"].encode())
            with pytest.raises(InvalidToken):
                old_ring.decrypt(version["token"].encode())
            assert name


def test_a_stdio_server_sees_a_rotated_env_secret_after_a_drained_restart(fleet: Fleet) -> None:
    getenv = fleet.run("envy", "getenv", 1, name="VAULT_VALUE").wait(30)
    value = next(iter(getenv.steps.values())).output["value"]
    # Three waves of 100 calls (the worker's concurrency): the rotation, once the first calls have ended, reaches
    # the worker while the second wave runs, with a wave (1 s) to spare on a loaded machine.
    run = fleet.run("envy", "concurrent", 300, seconds=1.0)
    fleet.wait_until_finished(run.id, 30)
    fleet.vault.set("stdio-value", f"rotated after {value}")
    result = run.wait(120)
    no_failed_call(result)
    pids = {step.output["pid"] for step in result.steps.values()}
    assert len(pids) == 2, "calls in flight finished on the old process, later ones went to the new one"
    after = fleet.run("envy", "getenv", 1, name="VAULT_VALUE").wait(30)
    assert next(iter(after.steps.values())).output["value"] == f"rotated after {value}"
    (new_pid,) = {step.output["pid"] for step in fleet.run("envy", "concurrent", 1, seconds=0).wait(30).steps.values()}
    (old_pid,) = pids - {new_pid}
    deadline = time.monotonic() + 15
    while process_alive(old_pid):
        assert time.monotonic() < deadline, "the drained stdio server was not stopped"
        time.sleep(0.1)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_no_secret_value_in_redis_or_the_logs(fleet: Fleet, redis_url: str) -> None:
    no_failed_call(fleet.run("envy", "echo", 2).wait(30))
    redis = Redis.from_url(redis_url)
    blobs = [blob for key in redis.scan_iter(count=1000) for blob in [key, *redis_values(redis, key)]]
    logs = [path.read_bytes() for folder in fleet.logs for path in folder.glob("*.log")]
    assert len(blobs) > 10 and logs
    for value in fleet.canaries:
        assert not any(value.encode() in blob for blob in blobs), "a secret value is in Redis"
        assert not any(value.encode() in log for log in logs), "a secret value is in a log"


def redis_values(redis: Redis, key: bytes) -> list[bytes]:
    kind = redis.type(key).decode()
    if kind == "string":
        return [redis.get(key) or b""]
    if kind == "hash":
        return [item for pair in redis.hgetall(key).items() for item in pair]
    if kind == "list":
        return list(redis.lrange(key, 0, -1))
    if kind == "set":
        return list(redis.smembers(key))
    if kind == "zset":
        return list(redis.zrange(key, 0, -1))
    if kind == "stream":
        return [repr(entry).encode() for entry in redis.xrange(key)]
    return []


def test_each_worker_reports_each_version_of_a_secret_it_reads_once(
    fleet: Fleet, records_database: RecordsDatabase
) -> None:
    before = fleet.vault.current("bearer-token")[0]
    no_failed_call(fleet.run("bearer", "echo", 3, value="read").wait(30))
    time.sleep(1.2)  # longer than a worker caches a secret: the next calls read the same version again
    no_failed_call(fleet.run("bearer", "echo", 3, value="read again").wait(30))
    token = fleet.rotate_token(grace=True)
    time.sleep(1.2)
    no_failed_call(fleet.run("bearer", "echo", 3, value="rotated").wait(30))
    fleet.accept(token)
    after = fleet.vault.current("bearer-token")[0]
    rows = audited(fleet.vault.redis, fleet.vault.namespace, records_database, "secret-read")
    reads = [json.loads(row.detail or "{}") for row in rows]
    mine = [(read["pid"], read["version"]) for read in reads if read["secret"] == "bearer-token"]
    assert len(mine) == len(set(mine)), "a worker reported a version of the secret it had reported already"
    assert {before, after} <= {version for _, version in mine} and before != after
    assert all(row.who == f"worker:{json.loads(row.detail or '{}')['worker']}" for row in rows)
    assert not any(value in (row.detail or "") for row in rows for value in fleet.canaries)
