"""Celery message signing: a signed fleet runs workflows; a forged or untrusted message pushed into Redis is
refused by the worker and reported, and no MCP traffic leaves (real Redis, a real worker, a real MCP server).
And the serializer on its own: Ed25519 and RSA keys, and what it refuses."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from celery.exceptions import SecurityError
from celery.security.certificate import Certificate, FSCertStore
from celery.security.key import PrivateKey
from celery.security.serialization import SecureSerializer
from cryptography.hazmat.primitives.asymmetric import rsa
from kombu import Message
from redis import Redis
from sqlalchemy import select

from orchestrator.deadletters import DeadLetters
from orchestrator.history import audit
from orchestrator.history.flusher import Flusher
from orchestrator.history.records import RecordStore
from orchestrator.history.tables import AuditRecord
from orchestrator.messages import StepCall
from tasks.calls import call
from workers.app import app, use_broker
from workers.request import DecodedRequest
from workers.signing import MessageCertificate, MessageCertStore, SigningPrivateKey, create_identity, secure_serializer

from .conftest import ROOT, RecordsDatabase


def _identity(directory: Path, name: str, key: SigningPrivateKey | None = None) -> tuple[Path, Path]:
    """A throwaway key (Ed25519 unless given; beside the directory: a certificate store holds certificates only)
    and its self-signed certificate in the directory, as PEM files."""
    key_path, cert_path = directory.parent / f"{name}.key", directory / f"{name}.pem"
    create_identity(key_path, cert_path, name, days=1, key=key)
    return key_path, cert_path


def _rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@dataclass
class Signed:
    config: Path
    rsa_config: Path
    untrusted: Path
    env: dict[str, str]
    log: Path
    calls: Path
    namespace: str

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=self.env, cwd=ROOT,
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    def traffic(self) -> int:
        return len(self.calls.read_text().splitlines()) if self.calls.exists() else 0

    def refusals(self) -> int:
        # Refusals on this fleet's service queue only: the worker also refuses other processes' JSON broadcasts.
        queue = f"{self.namespace}.guarded"
        return self.log.read_text(errors="replace").count(f'"event": "message-refused", "queue": "{queue}"')


def _config(home: Path, key: Path, cert: Path, store: Path, state: Path) -> dict[str, object]:
    return {
        "servers": {"guarded": {"command": "python", "args": [str(ROOT / "tests" / "servers" / "faulty.py")],
                                "env": {"FAULTY_STATE": str(state)}}},
        "services": {"guarded": {"server": "guarded", "tools": ["work"], "timeout": 20, "retries": 0}},
        "workflows": {"deploy": {"steps": [{"id": "work", "service": "guarded", "tool": "work"}]}},
        "access": {"enabled": False, "signing": {"key": str(key), "certificate": str(cert), "store": str(store)}},
    }  # fmt: skip


@pytest.fixture(scope="module")
def signed(worker_env: dict[str, str], redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Signed]:
    use_broker(redis_url)  # this process sends the unsigned message: to the tests' Redis, the embedded one too
    home = tmp_path_factory.mktemp("signed")
    store = home / "trusted"
    store.mkdir()
    key, cert = _identity(store, "fleet")
    rsa_key, rsa_cert = _identity(store, "fleet-rsa", _rsa())  # an RSA key, as fleets had before, trusted too
    bad_key, bad_cert = _identity(home, "mallory")
    state = home / "state.json"
    path, rsa_path, untrusted = home / "signed.yaml", home / "rsa.yaml", home / "untrusted.yaml"
    path.write_text(yaml.safe_dump(_config(home, key, cert, store, state)))
    rsa_path.write_text(yaml.safe_dump(_config(home, rsa_key, rsa_cert, store, state)))
    untrusted.write_text(yaml.safe_dump(_config(home, bad_key, bad_cert, store, state)))
    # A namespace of its own: every worker consumes its namespace's control queue, and unsigned workers of
    # other tests must neither take nor be given this fleet's messages.
    namespace = f"{worker_env['MCPO_NAMESPACE']}-signed"
    env = {**worker_env, "MCPO_NAMESPACE": namespace}
    log = home / "worker.log"
    with log.open("wb") as output:
        worker = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "worker", "--service", "guarded",
                                   "--config", str(path), "--loglevel", "INFO"], env=env, cwd=ROOT, stdout=output,
                                  stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while " ready." not in log.read_text(errors="replace"):
            assert worker.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.2)
        yield Signed(path, rsa_path, untrusted, env, log, state.with_suffix(".calls"), namespace)
    finally:
        worker.terminate()
        worker.wait(30)


def _send_unsigned(signed: Signed) -> None:
    call = StepCall(run_id=uuid.uuid4().hex, step_id="work", service="guarded", tool="work", arguments={},
                    timeout=20, retries=0)  # fmt: skip
    app.send_task("mcpo.call", kwargs=call.message(), queue=f"{signed.namespace}.guarded", serializer="json")


def test_a_refused_message_goes_on_the_audit_chain_before_any_task_ran(
    signed: Signed, redis_url: str, records_database: RecordsDatabase
) -> None:
    # First in this module: the worker has run no task yet, so no runtime watches its security events.
    refused = signed.refusals()
    _send_unsigned(signed)
    _wait_for_refusals(signed, refused + 1)
    store = RecordStore(records_database.url)
    Flusher(Redis.from_url(redis_url), signed.namespace, store).flush(60)
    with store.session() as session:
        rows = session.scalars(select(AuditRecord).where(AuditRecord.action == "message-refused"))
        mine = [row for row in rows if f"{signed.namespace}.guarded" in (row.detail or "")]
        assert audit.verify(session)[1] is None
    assert len(mine) == refused + 1 and mine[-1].who == "anonymous"


def test_a_signed_fleet_runs_workflows(signed: Signed) -> None:
    done = signed.cli("run", "deploy", "--config", str(signed.config), "--timeout", "60")
    assert done.returncode == 0, done.stderr
    assert signed.traffic() >= 1


def test_a_run_signed_with_an_rsa_key_succeeds(signed: Signed) -> None:
    # The run's messages are signed with RSA and verified by the worker (which signs its own with Ed25519).
    before, refused = signed.traffic(), signed.refusals()
    done = signed.cli("run", "deploy", "--config", str(signed.rsa_config), "--timeout", "60")
    assert done.returncode == 0, done.stderr
    assert signed.traffic() > before and signed.refusals() == refused


def _wait_for_refusals(signed: Signed, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while signed.refusals() < count:
        assert time.monotonic() < deadline, signed.log.read_text(errors="replace")[-3000:]
        time.sleep(0.1)


def test_an_unsigned_message_pushed_into_redis_is_refused(signed: Signed, redis_url: str) -> None:
    before, refused = signed.traffic(), signed.refusals()
    _send_unsigned(signed)
    _wait_for_refusals(signed, refused + 1)
    assert signed.traffic() == before
    # Quarantined (workers/quarantine.py), not dropped: kept in the dead letters with why.
    letters = DeadLetters(Redis.from_url(redis_url), signed.namespace).list()
    assert "ContentDisallowed" in letters[-1].reason and letters[-1].queue == f"{signed.namespace}.guarded"


def test_a_message_signed_by_an_untrusted_key_is_refused(signed: Signed, redis_url: str) -> None:
    before, refused = signed.traffic(), signed.refusals()
    send = (
        "import sys, uuid; from orchestrator.config import load_config; from workers.app import app, use_broker;"
        "from workers.signing import use_signing; import celeryconfig;"
        "use_broker(celeryconfig.settings.redis_url); use_signing(load_config(sys.argv[1]));"
        "app.send_task('mcpo.call', kwargs={'run_id': uuid.uuid4().hex, 'step_id': 'work', 'service': 'guarded',"
        "'tool': 'work', 'arguments': {}, 'timeout': 20, 'retries': 0}, queue=sys.argv[2])"
    )
    sent = subprocess.run([sys.executable, "-c", send, str(signed.untrusted), f"{signed.namespace}.guarded"],
                          env=signed.env, cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    _wait_for_refusals(signed, refused + 1)
    assert signed.traffic() == before
    assert "SecurityError" in DeadLetters(Redis.from_url(redis_url), signed.namespace).list()[-1].reason


MESSAGE = {"task": "mcpo.call", "kwargs": {"tool": "work", "arguments": {"target": "staging"}}}


def _altered(data: str) -> str:
    """The signed message with its body changed and its signature and signer kept."""
    head, body = base64.b64decode(data).rsplit(b"\x00\x01", 1)  # the body is the last field
    assert b"staging" in body
    return base64.b64encode(head + b"\x00\x01" + body.replace(b"staging", b"prod")).decode()


@pytest.mark.parametrize("kind", ["ed25519", "rsa"])
def test_the_serializer_accepts_only_unaltered_messages_of_trusted_keys(kind: str, tmp_path: Path) -> None:
    store = tmp_path / "trusted"
    key, cert = _identity(store, "fleet", _rsa() if kind == "rsa" else None)
    mallory_key, mallory_cert = _identity(tmp_path / "elsewhere", "mallory")  # Ed25519, not in the store
    fleet = secure_serializer(key, cert, store)
    signed = fleet.serialize(MESSAGE)
    assert fleet.deserialize(signed) == MESSAGE
    with pytest.raises(SecurityError, match="Bad signature"):
        fleet.deserialize(_altered(signed))
    with pytest.raises(SecurityError, match="Unknown certificate"):
        fleet.deserialize(secure_serializer(mallory_key, mallory_cert, store).serialize(MESSAGE))
    with pytest.raises(SecurityError, match="Bad signature"):  # mallory's signature, the fleet's signer id
        fleet.deserialize(secure_serializer(mallory_key, cert, store).serialize(MESSAGE))


def test_a_certificate_expired_since_the_start_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key, cert = _identity(tmp_path / "trusted", "fleet")
    fleet = secure_serializer(key, cert, tmp_path / "trusted")
    signed = fleet.serialize(MESSAGE)
    monkeypatch.setattr(MessageCertificate, "has_expired", lambda self: True)
    with pytest.raises(SecurityError, match="Expired certificate"):
        fleet.deserialize(signed)


def test_the_store_refuses_a_duplicate_certificate_and_an_empty_directory(tmp_path: Path) -> None:
    _, cert = _identity(tmp_path / "trusted", "fleet")
    (tmp_path / "trusted" / "copy.pem").write_bytes(cert.read_bytes())
    with pytest.raises(SecurityError, match="Duplicate certificate"):
        MessageCertStore(tmp_path / "trusted")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SecurityError, match="no trusted certificate"):
        MessageCertStore(tmp_path / "empty")


def test_rsa_messages_are_celerys_own(tmp_path: Path) -> None:
    # An RSA fleet signs and verifies as Celery's setup_security does: its processes can be updated one by one.
    key, cert = _identity(tmp_path / "trusted", "fleet", _rsa())
    ours = secure_serializer(key, cert, tmp_path / "trusted")
    celerys = SecureSerializer(PrivateKey(key.read_text()), Certificate(cert.read_text()),
                               FSCertStore(str(tmp_path / "trusted")), "sha256", serializer="json")  # fmt: skip
    assert celerys.deserialize(ours.serialize(MESSAGE)) == MESSAGE
    assert ours.deserialize(celerys.serialize(MESSAGE)) == MESSAGE


def test_a_worker_decodes_each_task_message_once() -> None:
    # The consumer decodes (for a signed message: verifies) each message as it arrives; the pool is handed that.
    class Counted(Message):  # type: ignore[misc]
        decodes = 0

        def _decode(self) -> Any:
            Counted.decodes += 1
            return super()._decode()

    payload = [[], {"run_id": "r1", "step_id": "s1"}, {"callbacks": None, "errbacks": None, "chain": None}]
    message = Counted(body=json.dumps(payload), content_type="application/json", content_encoding="utf-8",
                      headers={"id": "t1", "task": "mcpo.call"}, delivery_info={})  # fmt: skip
    request = DecodedRequest(message, app=app, task=call)
    assert (request.body, request.content_type) == (payload, None)  # no content type: Celery's pool decodes nothing
    assert request.kwargs == payload[1] and Counted.decodes == 1
