"""Celery message signing: a signed fleet runs workflows; a forged or untrusted message pushed into Redis is
refused by the worker and reported, and no MCP traffic leaves (real Redis, a real worker, a real MCP server)."""

from __future__ import annotations

import datetime
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from redis import Redis
from sqlalchemy import select

from orchestrator import audit
from orchestrator.flusher import Flusher
from orchestrator.records import RecordStore
from orchestrator.tables import AuditRecord
from workers.app import app
from workers.execution import StepCall

from .conftest import ROOT, RecordsDatabase


def _identity(directory: Path, name: str) -> tuple[Path, Path]:
    """A throwaway RSA key (beside the directory: a certificate store holds certificates only) and its
    self-signed certificate in the directory, as PEM files."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))  # fmt: skip
    key_path, cert_path = directory.parent / f"{name}.key", directory / f"{name}.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


@dataclass
class Signed:
    config: Path
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
        return self.log.read_text(errors="replace").count('"event": "message-refused"')


def _config(home: Path, key: Path, cert: Path, store: Path, state: Path) -> dict[str, object]:
    return {
        "servers": {"guarded": {"command": "python", "args": [str(ROOT / "tests" / "servers" / "faulty.py")],
                                "env": {"FAULTY_STATE": str(state)}}},
        "services": {"guarded": {"server": "guarded", "tools": ["work"], "timeout": 20, "retries": 0}},
        "workflows": {"deploy": {"steps": [{"id": "work", "service": "guarded", "tool": "work"}]}},
        "access": {"enabled": False, "signing": {"key": str(key), "certificate": str(cert), "store": str(store)}},
    }  # fmt: skip


@pytest.fixture(scope="module")
def signed(worker_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Signed]:
    home = tmp_path_factory.mktemp("signed")
    store = home / "trusted"
    store.mkdir()
    key, cert = _identity(store, "fleet")
    bad_key, bad_cert = _identity(home, "mallory")
    state = home / "state.json"
    path, untrusted = home / "signed.yaml", home / "untrusted.yaml"
    path.write_text(yaml.safe_dump(_config(home, key, cert, store, state)))
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
        yield Signed(path, untrusted, env, log, state.with_suffix(".calls"), namespace)
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


def _wait_for_refusals(signed: Signed, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while signed.refusals() < count:
        assert time.monotonic() < deadline, signed.log.read_text(errors="replace")[-3000:]
        time.sleep(0.1)


def test_an_unsigned_message_pushed_into_redis_is_refused(signed: Signed) -> None:
    before, refused = signed.traffic(), signed.refusals()
    _send_unsigned(signed)
    _wait_for_refusals(signed, refused + 1)
    assert signed.traffic() == before


def test_a_message_signed_by_an_untrusted_key_is_refused(signed: Signed) -> None:
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
