"""Access control end to end: issued and OIDC tokens, the RBAC matrix at the API, and the worker's own check of
each step message (real Redis, real worker processes, a real MCP server that counts the calls it gets)."""

from __future__ import annotations

import base64
import http.server
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fakeredis
import jwt
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from redis import Redis
from sqlalchemy import select

from orchestrator import Orchestrator, Workflow, load_config
from orchestrator.compiler import compile_run
from orchestrator.errors import InvalidToken, PermissionDenied
from orchestrator.history import audit
from orchestrator.history.flusher import Flusher
from orchestrator.history.records import RecordStore
from orchestrator.history.tables import AuditRecord
from orchestrator.messages import StepCall
from orchestrator.runs import RunStore
from orchestrator.security.access import AccessControl, AccessSettings, Policy
from orchestrator.security.identity import Identity, Revocations, SigningKey, TokenBook, mint_caller
from workers import guard
from workers.app import app, queue_for
from workers.signing import secure_serializer

from .conftest import ROOT, RecordsDatabase, WorkerProcesses, cli_at_once

ROLES = ("viewer", "operator", "admin")


@dataclass
class Secure:
    """A configuration with access control on, its worker, and a token of each shipped role."""

    config_path: Path
    state: Path
    redis: Redis
    tokens: dict[str, str]
    token_ids: dict[str, str]
    redis_url: str
    key: bytes

    def orch(self, token: str | None) -> Orchestrator:
        return Orchestrator(load_config(self.config_path), redis_url=self.redis_url, token=token)

    def calls(self) -> int:
        calls = self.state.with_suffix(".calls")
        return len(calls.read_text().splitlines()) if calls.exists() else 0

    def pending_run(self, workflow: str, params: dict[str, Any] | None = None) -> str:
        """A run that exists (as enqueue writes it) but whose messages were never sent."""
        config = load_config(self.config_path)
        graph = config.graph(config.workflow(workflow), workflow)
        run_id = uuid.uuid4().hex
        store = RunStore(self.redis, _namespace(), 3600)
        store.write(run_id, store.records(graph, "test", params or {}))
        return run_id


def _namespace() -> str:
    import celeryconfig

    return celeryconfig.settings.namespace


@pytest.fixture(scope="module")
def secure(redis_url: str, workers: WorkerProcesses, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secure]:
    home = tmp_path_factory.mktemp("secure")
    state = home / "state.json"
    config = {
        "servers": {"guarded": {"command": "python", "args": [str(ROOT / "tests" / "servers" / "faulty.py")],
                                "env": {"FAULTY_STATE": str(state)}}},
        "services": {
            "guarded": {"server": "guarded", "tools": ["work"], "timeout": 20, "retries": 0},
            "spare": {"server": "guarded", "tools": ["work"]},
        },
        "workflows": {
            "deploy-app": {"steps": [{"id": "work", "service": "guarded", "tool": "work", "parameters": {"x": 1}}]},
            "other": {"steps": [{"id": "work", "service": "guarded", "tool": "work", "parameters": {"x": 2}}]},
            # a, then b and c together, then d, e and f in a chain: each shape a caller token travels through.
            "deploy-dag": {"steps": [{"id": step, "service": "guarded", "tool": "work", "parameters": {"x": 3},
                                      "depends_on": deps} for step, deps in
                                     [("a", []), ("b", ["a"]), ("c", ["a"]), ("d", ["b", "c"]), ("e", ["d"]),
                                      ("f", ["e"])]]},
        },
        "access": {"enabled": True, "roles": {"deployer": {"permissions": {"run": ["workflow:deploy-*"]}},
                                              "reader": {"permissions": {"read": ["workflow:deploy-*"]}}}},
    }  # fmt: skip
    path = home / "secure.yaml"
    path.write_text(yaml.safe_dump(config))
    signing = SigningKey.from_environment()  # the key file under MCPO_HOME, which the workers share
    signing.ensure()
    redis = Redis.from_url(redis_url)
    book = TokenBook(redis, _namespace())
    issued = {role: book.issue(f"{role}-user", role, 3600) for role in (*ROLES, "deployer", "reader")}
    workers.start("guarded", config=path)
    yield Secure(path, state, redis, {r: t for r, (t, _) in issued.items()}, {r: i.id for r, (_, i) in issued.items()},
                 redis_url, signing.load())  # fmt: skip
    redis.close()


# What each shipped role may do at the API: viewer reads, operator also runs and cancels, admin does all.
ALLOWED = {
    "viewer": {"status", "services", "discover", "health_history"},
    "operator": {"status", "services", "discover", "health_history", "enqueue", "run", "cancel"},
    "admin": {"status", "services", "discover", "health_history", "enqueue", "run", "cancel", "register",
              "deregister"},
}  # fmt: skip
OPERATIONS: dict[str, Callable[[Orchestrator, str], Any]] = {
    "enqueue": lambda o, run_id: o.enqueue("deploy-app").wait(60),
    "run": lambda o, run_id: o.run("deploy-app", timeout=60),
    "status": lambda o, run_id: o.status(run_id),
    "cancel": lambda o, run_id: o.cancel(run_id),
    "services": lambda o, run_id: o.fleet.services(),
    "discover": lambda o, run_id: o.fleet.discover(["guarded"]),
    "register": lambda o, run_id: o.fleet.register("spare", f"extra-{run_id}", "http://127.0.0.1:9/mcp"),
    "deregister": lambda o, run_id: o.fleet.deregister("spare", f"extra-{run_id}"),
    "health_history": lambda o, run_id: o.fleet.health_history("guarded", "guarded"),
}


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
@pytest.mark.parametrize("role", ROLES)
def test_rbac_matrix_at_the_api(secure: Secure, role: str, operation: str) -> None:
    run_id = secure.pending_run("deploy-app")
    with secure.orch(secure.tokens[role]) as orch:
        if operation == "deregister":  # something to remove, put there by an admin
            with secure.orch(secure.tokens["admin"]) as admin:
                admin.fleet.register("spare", f"extra-{run_id}", "http://127.0.0.1:9/mcp")
        if operation in ALLOWED[role]:
            result = OPERATIONS[operation](orch, run_id)
            if operation in ("enqueue", "run"):
                assert result.status == "succeeded", result.errors
            if operation == "register":
                orch.fleet.deregister("spare", f"extra-{run_id}")
        else:
            with pytest.raises(PermissionDenied, match=rf"^permission denied: {role}-user \({role}\) may not "):
                OPERATIONS[operation](orch, run_id)


def test_no_token_or_a_bad_one_is_denied_at_the_api(secure: Secure) -> None:
    with secure.orch(None) as orch, pytest.raises(InvalidToken, match="no token"):
        orch.enqueue("deploy-app")
    forged = jwt.encode({"sub": "mallory", "role": "admin", "jti": "x", "exp": int(time.time()) + 60,
                         "iss": "mcp-orchestrator", "aud": "mcpo:api"}, b"k" * 32, algorithm="HS256")  # fmt: skip
    with secure.orch(forged) as orch, pytest.raises(InvalidToken, match="bad signature"):
        orch.status(secure.pending_run("deploy-app"))


def test_custom_role_runs_only_matching_workflows(secure: Secure) -> None:
    with secure.orch(secure.tokens["deployer"]) as orch:
        assert orch.run("deploy-app", timeout=60).status == "succeeded"
        with pytest.raises(PermissionDenied, match=r"deployer-user \(deployer\) may not run on workflow:other$"):
            orch.run("other", timeout=60)
        with pytest.raises(PermissionDenied, match="may not enqueue on workflow:deploy-app"):
            orch.enqueue("deploy-app")


def _send(secure: Secure, run_id: str, caller: str | None) -> None:
    """A step message written straight to the broker, as anyone with access to Redis could."""
    call = StepCall(run_id=run_id, step_id="work", service="guarded", tool="work", arguments={"x": "forged"},
                    timeout=20, retries=0, caller=caller)  # fmt: skip
    app.send_task("mcpo.call", kwargs=call.message(), queue=queue_for("guarded"), kwargsrepr="forged")


def _step_after(secure: Secure, run_id: str, timeout: float = 30) -> Any:
    store = RunStore(secure.redis, _namespace(), 3600)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        step = store.load(run_id).steps["work"]
        if step.status not in ("pending", "running"):
            return step
        time.sleep(0.05)
    raise AssertionError(f"step of run {run_id} did not end within {timeout} s")


def _caller(secure: Secure, run_id: str, role: str, *, workflow: str = "deploy-app", action: str = "run",
            ttl: float = 600, parent: str | None = None, key: bytes | None = None) -> str:  # fmt: skip
    identity = Identity(f"{role}-user", (role,), parent, None, "issued")
    return mint_caller(key or secure.key, identity, run_id, workflow, action, ttl)


CASES: dict[str, tuple[Callable[[Secure, str], str | None], str]] = {
    "absent": (lambda s, run_id: None, "the message carries no caller token"),
    "forged": (lambda s, run_id: _caller(s, run_id, "admin", key=b"f" * 32), "invalid caller token (bad signature)"),
    "viewer": (lambda s, run_id: _caller(s, run_id, "viewer"), "viewer-user may not run on workflow:deploy-app"),
    "beyond its role": (lambda s, run_id: _caller(s, run_id, "deployer", workflow="other"),
                        "deployer-user may not run on workflow:other"),
    "expired": (lambda s, run_id: _caller(s, run_id, "operator", ttl=-60), "invalid caller token (expired)"),
    "other run": (lambda s, run_id: _caller(s, uuid.uuid4().hex, "operator"), "is bound to another run"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_worker_refuses_a_message_without_a_valid_caller_token(secure: Secure, case: str) -> None:
    secure.state.write_text(json.dumps({"mode": "ok"}))
    before = secure.calls()
    run_id = secure.pending_run("deploy-app")
    make, reason = CASES[case]
    _send(secure, run_id, make(secure, run_id))
    step = _step_after(secure, run_id)
    assert step.status == "failed" and step.error_type == "PermissionDenied"
    assert reason in (step.error or "")
    assert secure.calls() == before  # no MCP traffic left the worker


def test_a_caller_token_checked_once_is_still_bound_to_its_run_and_refused_once_expired(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = SigningKey(base64.urlsafe_b64encode(b"k" * 32).decode())
    check = guard.CallGuard(Policy(AccessSettings()), key, Revocations(fakeredis.FakeRedis(), "ns"))
    token = mint_caller(key.load(), Identity("olga", ("operator",), None, None, "issued"), "r1", "wf", "run", 30)
    call = StepCall(run_id="r1", step_id="s", service="svc", tool="t", arguments={}, timeout=5, retries=0, caller=token)
    assert check.refusal(call) is None
    assert check.refusal(call) is None  # its signature is not checked again
    assert "bound to another run" in (check.refusal(replace(call, run_id="r2")) or "")
    monkeypatch.setattr(guard, "time", SimpleNamespace(time=lambda: time.time() + 60))
    assert check.refusal(call) == "permission denied: invalid caller token (expired)"


def test_a_chain_hands_its_caller_token_on_so_each_message_carries_one(secure: Secure) -> None:
    canvas = compile_run("r1", _graph(secure, "deploy-dag"), caller="t0ken")
    assert json.dumps(dict(canvas)).count("t0ken") == 4  # a, b, c and d: e and f get theirs from the step before
    secure.state.write_text(json.dumps({"mode": "ok"}))
    with secure.orch(secure.tokens["operator"]) as orch:
        result = orch.run("deploy-dag", timeout=60)
    assert result.status == "succeeded", result.errors
    assert sorted(result.steps) == list("abcdef")


def _graph(secure: Secure, workflow: str) -> Any:
    config = load_config(secure.config_path)
    return config.graph(config.workflow(workflow), workflow)


def test_worker_runs_a_message_with_a_valid_caller_token_and_refuses_it_once_revoked(secure: Secure) -> None:
    book = TokenBook(secure.redis, _namespace())
    token, info = book.issue("rita", "operator", 600)
    run_id = secure.pending_run("deploy-app")
    before = secure.calls()
    _send(secure, run_id, _caller(secure, run_id, "operator", parent=info.id))
    assert _step_after(secure, run_id).status == "succeeded"
    assert secure.calls() == before + 1

    assert book.revoke(info.id)
    with pytest.raises(InvalidToken, match="revoked"):
        book.verify(token)
    time.sleep(1.2)  # workers read the revoked set at most once a second
    run_id = secure.pending_run("deploy-app")
    _send(secure, run_id, _caller(secure, run_id, "operator", parent=info.id))
    step = _step_after(secure, run_id)
    assert step.status == "failed" and "was revoked" in (step.error or "")
    assert secure.calls() == before + 1


def test_caller_tokens_never_reach_a_log_and_refusals_are_reported(secure: Secure, workers: WorkerProcesses) -> None:
    with secure.orch(secure.tokens["operator"]) as orch:
        result = orch.run("deploy-app", timeout=60)
    assert result.status == "succeeded", result.errors
    logs = "".join(p.read_text(errors="replace") for p in workers.log_dir.glob("worker-guarded-*.log"))
    assert "security event" in logs and "call-refused" in logs  # the refusals of the tests above
    assert not any(token in logs for token in secure.tokens.values())
    assert ".eyJ" not in logs  # no JWT of any kind, caller tokens included


def test_token_issue_verify_revoke_and_expiry(secure: Secure) -> None:
    book = TokenBook(secure.redis, _namespace())
    token, info = book.issue("alice", "operator", 600)
    identity = book.verify(token)
    assert (identity.subject, identity.roles, identity.token_id) == ("alice", ("operator",), info.id)
    stored = secure.redis.hget(book.key, info.id) or b""
    assert token.encode() not in stored and json.loads(stored)["sha256"]  # only the hash is kept
    assert [i.subject for i in book.list() if i.id == info.id] == ["alice"]
    assert book.revoke(info.id) and not book.revoke(info.id)
    with pytest.raises(InvalidToken, match="revoked"):
        book.verify(token)
    expired, _ = book.issue("bob", "viewer", -60)
    with pytest.raises(InvalidToken, match="expired"):
        book.verify(expired)
    caller = mint_caller(secure.key, identity, "run", "wf", "run", 60)
    with pytest.raises(InvalidToken, match="Audience"):
        book.verify(caller)  # a run's caller token is no API token


class Jwks:
    """A local OIDC provider's JWKS endpoint and its signing key."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public = self.key.public_key().public_numbers()
        self.body = json.dumps({"keys": [{"kty": "RSA", "kid": "k1", "use": "sig", "alg": "RS256",
                                          "n": _b64(public.n), "e": _b64(public.e)}]}).encode()  # fmt: skip
        body = self.body

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"

    def token(self, key: Any = None, **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": "https://idp.test", "aud": "mcpo", "sub": "carol", "iat": now, "exp": now + 300, **claims}
        return jwt.encode(body, key or self.key, algorithm="RS256", headers={"kid": "k1"})


def _b64(number: int) -> str:
    raw = number.to_bytes((number.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def jwks() -> Iterator[Jwks]:
    provider = Jwks()
    yield provider
    provider.server.shutdown()


def test_oidc_tokens_are_verified_against_the_jwks_and_claims_map_to_roles(secure: Secure, jwks: Jwks) -> None:
    settings = AccessSettings.model_validate({
        "oidc": {"issuer": "https://idp.test", "audience": "mcpo", "jwks_url": jwks.url},
        "role_claims": {"platform-ops": "operator", "auditors": ["viewer"]},
    })  # fmt: skip
    access = AccessControl(settings, secure.redis, _namespace())
    identity = access.authenticate(jwks.token(groups=["platform-ops", "unrelated"]))
    assert (identity.subject, identity.roles, identity.source) == ("carol", ("operator",), "oidc")
    assert access.authenticate(jwks.token(roles=["auditors"])).roles == ("viewer",)
    access.require(jwks.token(groups=["platform-ops"]), "run", "workflow:deploy-app")
    with pytest.raises(PermissionDenied, match=r"carol \(no role\) may not read"):
        access.require(jwks.token(groups=["strangers"]), "read", "workflow:deploy-app")
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(InvalidToken, match="bad signature"):
        access.authenticate(jwks.token(key=other))
    with pytest.raises(InvalidToken, match="Audience"):
        access.authenticate(jwks.token(aud="someone-else"))
    with pytest.raises(InvalidToken, match="expired"):
        access.authenticate(jwks.token(exp=int(time.time()) - 60))


def test_an_oidc_caller_runs_a_workflow_through_the_worker(secure: Secure, jwks: Jwks, tmp_path: Path) -> None:
    config = yaml.safe_load(secure.config_path.read_text())
    config["access"]["oidc"] = {"issuer": "https://idp.test", "audience": "mcpo", "jwks_url": jwks.url}
    config["access"]["role_claims"] = {"platform-ops": "operator"}
    path = tmp_path / "oidc.yaml"
    path.write_text(yaml.safe_dump(config))
    with Orchestrator(load_config(path), redis_url=secure.redis_url, token=jwks.token(groups=["platform-ops"])) as o:
        assert o.run("deploy-app", timeout=60).status == "succeeded"


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_cli_denies_with_exit_2_and_never_shows_a_token(secure: Secure, worker_env: dict[str, str]) -> None:
    config = str(secure.config_path)
    viewer = {**worker_env, "MCPO_TOKEN": secure.tokens["viewer"]}
    denied = _cli(viewer, "secrets", "list", "--config", config)
    assert denied.returncode == 2
    assert "permission denied: viewer-user (viewer) may not secrets on secret:*" in denied.stderr
    assert _cli(worker_env, "--token", secure.tokens["viewer"], "keys", "rotate", "--config", config).returncode == 2

    admin = {**worker_env, "MCPO_TOKEN": secure.tokens["admin"]}
    issued = _cli(
        admin, "tokens", "issue", "--subject", "dave", "--role", "deployer", "--ttl", "1h", "--config", config
    )
    assert issued.returncode == 0, issued.stderr
    token = issued.stdout.strip()
    listed = _cli(admin, "tokens", "list", "--config", config)
    assert listed.returncode == 0 and "dave" in listed.stdout and token not in listed.stdout + listed.stderr
    assert _cli(viewer, "tokens", "list", "--config", config).returncode == 2
    token_id = TokenBook(secure.redis, _namespace()).verify(token).token_id or ""
    revoked = _cli(admin, "tokens", "revoke", token_id, "--config", config)
    assert revoked.returncode == 0 and token not in revoked.stdout + revoked.stderr
    ran = _cli({**worker_env, "MCPO_TOKEN": token}, "enqueue", "deploy-app", "--config", config)
    assert ran.returncode == 2 and "revoked" in ran.stderr and token not in ran.stderr


def test_init_secure_sets_up_keys_an_admin_token_and_the_access_section(worker_env: dict[str, str],
                                                                        tmp_path: Path) -> None:  # fmt: skip
    env = {**worker_env, "MCPO_HOME": str(tmp_path / "home")}
    config = tmp_path / "services.yaml"
    config.write_text((ROOT / "tests" / "services.yaml").read_text().replace("servers/", str(ROOT / "tests") + "/"))
    done = _cli(env, "init", "--secure", "--config", str(config))
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert (tmp_path / "home" / "token.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "home" / "vault.keys").stat().st_mode & 0o777 == 0o600
    key, certificate = tmp_path / "home" / "fleet.key", tmp_path / "home" / "trusted" / "fleet.pem"
    assert key.stat().st_mode & 0o777 == 0o600
    assert isinstance(serialization.load_pem_private_key(key.read_bytes(), None), ed25519.Ed25519PrivateKey)
    fleet = secure_serializer(key, certificate, certificate.parent)  # the message signing key, ready to be used
    assert fleet.deserialize(fleet.serialize({"signed": True})) == {"signed": True}
    assert "message signing is on" in done.stderr and "to switch it off, remove `signing:`" in done.stderr
    access = load_config(config).access
    assert access is not None and access.signing is not None and access.signing.key == key
    assert "testing" in load_config(config).servers
    assert _cli({**env, "MCPO_TOKEN": token}, "tokens", "list", "--config", str(config)).returncode == 0
    assert _cli(env, "tokens", "list", "--config", str(config)).returncode == 2  # no token now
    again = _cli(env, "init", "--secure", "--config", str(config))  # another admin token is the admin's to issue
    assert again.returncode == 2 and "no token" in again.stderr


def test_access_off_is_said_once(worker_env: dict[str, str], tmp_path: Path) -> None:
    env = {**worker_env, "MCPO_HOME": str(tmp_path / "home")}
    first = _cli(env, "status", "no-such-run")
    second = _cli(env, "status", "no-such-run")
    assert first.returncode == second.returncode == 2
    assert "access control is off" in first.stderr and "access control is off" not in second.stderr


def test_workflow_objects_are_checked_by_their_name(secure: Secure) -> None:
    workflow = Workflow.model_validate({"id": "deploy-adhoc", "steps": [{"service": "guarded", "tool": "work"}]})
    with secure.orch(secure.tokens["deployer"]) as orch:
        assert orch.run(workflow, timeout=60).status == "succeeded"
    with secure.orch(secure.tokens["viewer"]) as orch, pytest.raises(PermissionDenied, match="workflow:deploy-adhoc"):
        orch.run(workflow, timeout=60)


def test_a_refusal_at_the_worker_goes_on_the_audit_chain(secure: Secure, records_database: RecordsDatabase) -> None:
    run_id = secure.pending_run("deploy-app")
    _send(secure, run_id, None)
    assert _step_after(secure, run_id).error_type == "PermissionDenied"
    store = RecordStore(records_database.url)
    Flusher(secure.redis, _namespace(), store).flush(60)
    with store.session() as session:
        refused = [row for row in session.scalars(select(AuditRecord).where(AuditRecord.action == "call-refused"))
                   if run_id in (row.detail or "")]  # fmt: skip
        assert audit.verify(session)[1] is None  # the chain holds with the refusal in it
    assert len(refused) == 1 and "no caller token" in (refused[0].detail or "")


def test_cli_secret_changes_are_audited_under_the_callers_name(secure: Secure, worker_env: dict[str, str],
                                                              records_database: RecordsDatabase,
                                                              tmp_path: Path) -> None:  # fmt: skip
    config, name = str(secure.config_path), f"audited-{uuid.uuid4().hex[:8]}"
    (tmp_path / "value").write_text("not-a-real-secret")
    env = {**worker_env, "MCPO_VAULT_KEY_FILE": str(tmp_path / "vault.keys")}
    admin, viewer = {**env, "MCPO_TOKEN": secure.tokens["admin"]}, {**env, "MCPO_TOKEN": secure.tokens["viewer"]}
    value = str(tmp_path / "value")
    assert _cli(admin, "secrets", "set", name, "--from-file", value, "--config", config).returncode == 0
    assert _cli(viewer, "secrets", "rm", name, "--config", config).returncode == 2
    assert _cli(admin, "secrets", "rm", name, "--config", config).returncode == 0
    store = RecordStore(records_database.url)
    Flusher(secure.redis, _namespace(), store).flush(60)
    with store.session() as session:
        rows = [(row.action, row.who) for row in session.scalars(select(AuditRecord).order_by(AuditRecord.seq))
                if f"secret:{name}" in (row.detail or "") or f'"secret":"{name}"' in (row.detail or "")]  # fmt: skip
        assert audit.verify(session)[1] is None
    assert rows == [("secret-set", "admin-user"), ("permission-denied", "viewer-user"),
                    ("secret-removed", "admin-user")]  # fmt: skip


# The access matrix of the CLI: every command by no token / a role it refuses / a role it allows. A row names the
# command's arguments (placeholders filled per test), the roles, the refusal's `may not <action> on <resource>`,
# and what must be there before the allowed call. Every command of `mcp-orchestrator` needs a row, or a reason
# in UNCHECKED (test_every_cli_command_is_in_the_access_matrix).


@dataclass(frozen=True)
class Row:
    args: tuple[str, ...]  # {config} {run} {sealed} {instance} {secret} {token_id} {letter} {file} {out} are filled in
    refused: str | None  # a role the command refuses; None: the command checks no permission
    allowed: str
    needs: str = ""  # what the refusal says the role may not do: "<action> on <resource>"
    prepare: Callable[[Secure, dict[str, str], dict[str, str]], None] | None = None
    exit_code: int = 0  # of the allowed call


def _registered(secure: Secure, values: dict[str, str], env: dict[str, str]) -> None:
    with secure.orch(secure.tokens["admin"]) as admin:
        admin.fleet.register("spare", values["instance"], "http://127.0.0.1:9/mcp")


def _secret_set(secure: Secure, values: dict[str, str], env: dict[str, str]) -> None:
    admin = {**env, "MCPO_TOKEN": secure.tokens["admin"]}
    done = _cli(admin, "secrets", "set", values["secret"], "--from-file", values["file"], "--config", values["config"])
    assert done.returncode == 0, done.stderr


def _token_issued(secure: Secure, values: dict[str, str], env: dict[str, str]) -> None:
    values["token_id"] = TokenBook(secure.redis, _namespace()).issue("spare-user", "viewer", 600)[1].id


def _dead_letter(secure: Secure, values: dict[str, str], env: dict[str, str]) -> None:
    from orchestrator.deadletters import DeadLetter, DeadLetters
    from orchestrator.history.events import operation_event

    event = operation_event("matrix-requeued", "tester").encode()  # writable once requeued onto the records buffer
    values["letter"] = DeadLetters(secure.redis, _namespace()).add(DeadLetter("record", "a matrix row", "", event))


CONFIG = ("--config", "{config}")
URL = ("--url", "http://127.0.0.1:9/mcp")
CLI_MATRIX: dict[str, Row] = {
    "run": Row(("run", "deploy-app", *CONFIG, "--timeout", "60"), "viewer", "deployer", "run on workflow:deploy-app"),
    "run --reveal": Row(("run", "deploy-app", "--reveal", *CONFIG, "--timeout", "60"), "deployer", "operator",
                        "reveal on workflow:deploy-app"),
    "enqueue": Row(("enqueue", "deploy-app", *CONFIG), "deployer", "operator", "enqueue on workflow:deploy-app"),
    "status": Row(("status", "{run}", *CONFIG), "deployer", "viewer", "read on workflow:deploy-app"),
    "status --reveal": Row(("status", "{sealed}", "--reveal", *CONFIG), "viewer", "operator",
                           "reveal on workflow:deploy-app"),
    "show": Row(("show", "{run}", *CONFIG), "deployer", "viewer", "read on workflow:deploy-app"),
    "show --reveal": Row(("show", "{sealed}", "--json", "--reveal", *CONFIG), "viewer", "operator",
                         "reveal on workflow:deploy-app"),
    "cancel": Row(("cancel", "{run}", *CONFIG), "viewer", "operator", "cancel on workflow:deploy-app"),
    "runs": Row(("runs", *CONFIG), "deployer", "viewer", "read on workflow:*"),
    "discover": Row(("discover", "--service", "guarded", *CONFIG), "deployer", "viewer", "read on service:guarded"),
    "services": Row(("services", *CONFIG), "deployer", "viewer", "read on service:*"),
    "register": Row(("register", "spare", "{instance}", *URL, *CONFIG), "operator", "admin",
                    "register on service:spare"),
    "deregister": Row(("deregister", "spare", "{instance}", *CONFIG), "operator", "admin",
                      "deregister on service:spare", _registered),
    "cache clear": Row(("cache", "clear", "spare", *CONFIG), "operator", "admin", "admin on service:spare"),
    "validate": Row(("validate", "{config}"), None, "viewer"),
    "secrets set": Row(("secrets", "set", "{secret}", "--from-file", "{file}", *CONFIG), "operator", "admin",
                       "secrets on secret:{secret}"),
    "secrets list": Row(("secrets", "list", *CONFIG), "operator", "admin", "secrets on secret:*"),
    "secrets rm": Row(("secrets", "rm", "{secret}", *CONFIG), "operator", "admin", "secrets on secret:{secret}",
                      _secret_set),
    "keys rotate": Row(("keys", "rotate", *CONFIG), "operator", "admin", "keys on vault", _secret_set),
    "tokens issue": Row(("tokens", "issue", "--subject", "spare-user", "--role", "viewer", "--ttl", "1m", *CONFIG),
                        "operator", "admin", "admin on tokens"),
    "tokens list": Row(("tokens", "list", *CONFIG), "operator", "admin", "admin on tokens"),
    "tokens revoke": Row(("tokens", "revoke", "{token_id}", *CONFIG), "operator", "admin", "admin on tokens",
                         _token_issued),
    "init": Row(("init", "--secure", "--ttl", "1m", *CONFIG), "operator", "admin", "admin on tokens"),
    "audit verify": Row(("audit", "verify", *CONFIG), "operator", "admin", "audit on audit"),
    "audit export": Row(("audit", "export", "--output", "{out}", *CONFIG), "operator", "admin", "audit on audit"),
    # {run} has not ended: the allowed caller passes the checks and is told it cannot be resumed yet
    "resume": Row(("resume", "{run}", *CONFIG), "viewer", "operator", "enqueue on workflow:deploy-app", exit_code=2),
    "dead-letters list": Row(("dead-letters", "list", *CONFIG), "operator", "admin", "audit on dead-letters"),
    "dead-letters show": Row(("dead-letters", "show", "{letter}", *CONFIG), "operator", "admin",
                             "audit on dead-letters", _dead_letter),
    "dead-letters requeue": Row(("dead-letters", "requeue", "{letter}", *CONFIG), "operator", "admin",
                                "admin on dead-letters", _dead_letter),
    "dead-letters purge": Row(("dead-letters", "purge", "--yes", *CONFIG), "operator", "admin",
                              "admin on dead-letters"),
    "db upgrade": Row(("db", "upgrade", *CONFIG), "operator", "admin", "admin on records"),
}  # fmt: skip
# Long-running fleet processes, not callers: what guards them is the caller token each message carries (checked
# before every MCP call) and message signing.
UNCHECKED = {"worker": "serves queues; checks each message's caller token", "beat": "schedules health beats"}


def _command_path(args: tuple[str, ...]) -> str:
    """The command words at the head of args (`audit export`), as click's tree of groups has them."""
    import click

    from orchestrator.cli import main

    command: click.Command = main
    words = []
    for word in args:
        if not isinstance(command, click.Group) or word not in command.commands:
            break
        command = command.commands[word]
        words.append(word)
    return " ".join(words)


def _leaf_commands() -> set[str]:
    import click

    from orchestrator.cli import main

    def walk(command: click.Command, path: tuple[str, ...]) -> set[str]:
        if not isinstance(command, click.Group):
            return {" ".join(path)}
        return {leaf for name, sub in command.commands.items() for leaf in walk(sub, (*path, name))}

    return walk(main, ())


def test_every_cli_command_is_in_the_access_matrix() -> None:
    covered = {_command_path(row.args) for row in CLI_MATRIX.values()} | set(UNCHECKED)
    assert _leaf_commands() - covered == set(), "add a row to CLI_MATRIX for each new command"


@pytest.fixture
def cli_env(worker_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """The CLI's environment, with a vault key ring of this test's own (keys rotate rewrites it)."""
    return {**worker_env, "MCPO_VAULT_KEY_FILE": str(tmp_path / "vault.keys")}


def _values(secure: Secure, tmp_path: Path) -> dict[str, str]:
    from orchestrator.security.sealing import seal_params

    (tmp_path / "value").write_text("not-a-real-secret")
    suffix = uuid.uuid4().hex[:8]
    return {"config": str(secure.config_path), "run": secure.pending_run("deploy-app"),
            "sealed": secure.pending_run("deploy-app", seal_params({"note": "sealed-value"})),
            "instance": f"matrix-{suffix}", "secret": f"matrix-{suffix}", "token_id": "", "letter": "0-1",
            "file": str(tmp_path / "value"), "out": str(tmp_path / "audit.jsonl")}  # fmt: skip


def _one_error_line(done: subprocess.CompletedProcess[str]) -> list[str]:
    assert "Traceback" not in done.stderr, done.stderr
    return [line for line in done.stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("name", sorted(CLI_MATRIX))
def test_cli_access_matrix(secure: Secure, cli_env: dict[str, str], tmp_path: Path, name: str) -> None:
    """The row's command with no token, with a role it refuses (these two at once), then with one it allows."""
    row = CLI_MATRIX[name]
    values = _values(secure, tmp_path)
    anonymous = {key: value for key, value in cli_env.items() if key != "MCPO_TOKEN"}
    args = [arg.format(**values) for arg in row.args]
    roles = [] if row.refused is None else [None, row.refused]  # None: no token; a row without a refused role
    refusals = cli_at_once([({**anonymous, "MCPO_TOKEN": secure.tokens[role]} if role else anonymous, args)
                            for role in roles])  # fmt: skip
    for role, done in zip(roles, refusals, strict=True):
        expected = ("permission denied: no token (pass --token or set MCPO_TOKEN)" if role is None
                    else f"permission denied: {role}-user ({role}) may not {row.needs.format(**values)}")  # fmt: skip
        assert (done.returncode, _one_error_line(done)) == (2, [f"error: {expected}"]), (role, done.stderr)
        assert "sealed-value" not in done.stdout + done.stderr
    if row.prepare is not None:
        row.prepare(secure, values, cli_env)
    args = [arg.format(**values) for arg in row.args]
    callers = [{**anonymous, "MCPO_TOKEN": secure.tokens[row.allowed]}] + ([anonymous] if row.refused is None else [])
    for env in callers:
        done = _cli(env, *args)
        # The row's secret is sealed under this test's key ring: left in the namespace's vault, a later test's
        # `keys rotate` (under the session's ring) could not open it.
        secure.redis.hdel(f"{_namespace()}:vault", values["secret"])
        assert done.returncode == row.exit_code, done.stderr
        assert "permission denied" not in done.stderr
        if "{sealed}" in row.args and "--json" in row.args and "--reveal" in row.args:
            assert "sealed-value" in done.stdout  # the permission that unseals, unsealing


def test_runs_lists_only_runs_of_workflows_the_caller_may_read(secure: Secure, cli_env: dict[str, str],
                                                                records_database: RecordsDatabase) -> None:  # fmt: skip
    deploy, other = secure.pending_run("deploy-app"), secure.pending_run("other")
    Flusher(secure.redis, _namespace(), RecordStore(records_database.url)).flush(60)

    def listed(role: str, *options: str) -> set[str]:
        done = _cli({**cli_env, "MCPO_TOKEN": secure.tokens[role]}, "runs", "--json", "--limit", "5000", *options,
                    "--config", str(secure.config_path))  # fmt: skip
        assert done.returncode == 0, done.stderr
        return {run["workflow"] for run in json.loads(done.stdout) if run["id"] in (deploy, other)}

    assert listed("viewer") == {"deploy-app", "other"}
    assert listed("reader") == {"deploy-app"}  # read on workflow:deploy-* only
    refused = _cli({**cli_env, "MCPO_TOKEN": secure.tokens["reader"]}, "runs", "--workflow", "other", "--config",
                   str(secure.config_path))  # fmt: skip
    assert refused.returncode == 2 and "reader-user (reader) may not read on workflow:other" in refused.stderr


def test_token_rows_name_who_issued_and_revoked_the_token(secure: Secure, cli_env: dict[str, str],
                                                          records_database: RecordsDatabase) -> None:  # fmt: skip
    admin, config = {**cli_env, "MCPO_TOKEN": secure.tokens["admin"]}, str(secure.config_path)
    subject = f"erin-{uuid.uuid4().hex[:8]}"
    issued = _cli(admin, "tokens", "issue", "--subject", subject, "--role", "viewer", "--ttl", "1h", "--config", config)
    assert issued.returncode == 0, issued.stderr
    token_id = TokenBook(secure.redis, _namespace()).verify(issued.stdout.strip()).token_id or ""
    assert _cli(admin, "tokens", "revoke", token_id, "--config", config).returncode == 0
    store = RecordStore(records_database.url)
    Flusher(secure.redis, _namespace(), store).flush(60)
    with store.session() as session:
        rows = [(row.action, row.who, json.loads(row.detail or "{}").get("for"))
                for row in session.scalars(select(AuditRecord).order_by(AuditRecord.seq))
                if token_id in (row.detail or "")]  # fmt: skip
    assert rows == [("token-issued", "admin-user", subject), ("token-revoked", "admin-user", subject)]
