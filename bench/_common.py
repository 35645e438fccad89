"""What both benchmarks share: a namespace, the broker, worker processes, a direct MCP session, tables.

Import this module before anything from orchestrator/, workers/ or celeryconfig: settings are read when
celeryconfig is first imported, and this module fixes a namespace (queues and keys) unique to the run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

NAMESPACE = f"bench-{uuid.uuid4().hex[:8]}"
os.environ["MCPO_NAMESPACE"] = NAMESPACE
HOME = Path(tempfile.mkdtemp(prefix="mcpo-bench-"))
os.environ["MCPO_HOME"] = str(HOME)  # MCP server stderr logs and the embedded Redis live here
RAW_QUEUE = f"{NAMESPACE}.raw"
os.environ["BENCH_RAW_QUEUE"] = RAW_QUEUE

from mcp import Client, StdioServerParameters  # noqa: E402
from redis import Redis  # noqa: E402

from orchestrator.embedded import EmbeddedRedis  # noqa: E402
from workers.app import queue_for, served_queues, use_broker  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "bench" / "services.yaml"
SAFLA = ROOT / "examples" / "servers" / "safla.py"
T = TypeVar("T")


@contextlib.contextmanager
def broker() -> Iterator[str]:
    """$REDIS_URL, else an embedded Redis started for this run; deletes the run's keys at the end."""
    url = os.environ.get("REDIS_URL")
    embedded = None if url else EmbeddedRedis(HOME)
    url = url or embedded.start()  # type: ignore[union-attr]
    os.environ["REDIS_URL"] = url
    use_broker(url)
    try:
        yield url
    finally:
        with contextlib.suppress(Exception), Redis.from_url(url) as client:
            for pattern in (f"{NAMESPACE}:*", f"{NAMESPACE}.*", f"_kombu.binding*.{NAMESPACE}.*"):
                for key in client.scan_iter(pattern, count=1000):
                    client.delete(key)
        if embedded is not None:
            embedded.stop()


class Workers:
    """Worker processes started by a benchmark (each in its own process group), stopped at the end."""

    def __init__(self, url: str, env: dict[str, str] | None = None) -> None:
        self.env = {**os.environ, "REDIS_URL": url, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})}
        self.processes: list[subprocess.Popen[bytes]] = []

    def ours(self, service: str, concurrency: int, config: Path = CONFIG, wait: bool = True) -> None:
        """`mcp-orchestrator worker` for one service of a configuration (bench/services.yaml by default);
        without `wait`, started but not waited for (this process cannot ask a signed worker)."""
        self._start(
            [sys.executable, "-m", "orchestrator.cli", "worker", "--service", service, "--config", str(config),
             "--concurrency", str(concurrency), "--loglevel", "WARNING"],
            queue_for(service), f"ours-{service}", wait,
        )  # fmt: skip

    def raw(self, concurrency: int) -> None:
        """A plain Celery worker of bench/raw_app.py on the raw queue, with the same thread pool."""
        self._start(
            [sys.executable, "-m", "celery", "-A", "bench.raw_app", "worker", "-P", "threads", "-c", str(concurrency),
             "-Q", RAW_QUEUE, "-n", f"raw-{os.getpid()}@%h", "--loglevel", "WARNING"],
            RAW_QUEUE, "raw",
        )  # fmt: skip

    def _start(self, args: list[str], queue: str, name: str, wait: bool = True, timeout: float = 60) -> None:
        log = open(HOME / f"worker-{name}.log", "wb")  # noqa: SIM115 (the child writes to it until it ends)
        process = subprocess.Popen(args, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
        self.processes.append(process)
        if not wait:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"worker {name} exited with {process.returncode}; see {log.name}")
            if queue in served_queues(0.5):
                return
        raise RuntimeError(f"worker {name} did not serve {queue} within {timeout} s; see {log.name}")

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def stop(self) -> None:
        """SIGTERM each worker (a warm shutdown), then end whatever is left in its process group."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # MCP servers the worker left behind
        self.processes.clear()


class DirectSession:
    """One MCP stdio session to the SAFLA server, held open by an owner task on a background event loop."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="direct-mcp", daemon=True)
        self._thread.start()
        self._stop = asyncio.Event()
        ready: concurrent.futures.Future[Client] = concurrent.futures.Future()
        self._owner = asyncio.run_coroutine_threadsafe(self._own(ready), self._loop)
        self.client = ready.result(60)

    async def _own(self, ready: concurrent.futures.Future[Client]) -> None:
        server = StdioServerParameters(command=sys.executable, args=[str(SAFLA)])
        try:
            async with Client(server, cache=None) as client:
                ready.set_result(client)
                await self._stop.wait()
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
            raise

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        """Run a coroutine on the session's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        with contextlib.suppress(Exception):
            self._owner.result(15)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


@contextlib.contextmanager
def scratch() -> Iterator[None]:
    """Removes the run's temporary home (worker logs, embedded Redis) unless the benchmark failed."""
    try:
        yield
    except BaseException:
        print(f"benchmark failed; worker logs kept in {HOME}", file=sys.stderr)
        raise
    shutil.rmtree(HOME, ignore_errors=True)


def cpu_seconds(pid: int, children: bool = True) -> float:
    """CPU time (user + system) of a process and, unless told not to, its descendants that are alive now."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()  # noqa: SIM115
    except FileNotFoundError:
        return 0.0
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    if not children:
        return own
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return own + sum(cpu_seconds(int(child)) for child in found)


def process_cpu(pids: Sequence[int], redis: Redis) -> float:
    """CPU time used so far by the processes (with their MCP servers and other children) and the Redis server."""
    return sum(cpu_seconds(pid) for pid in pids) + redis_cpu(redis)


def redis_cpu(redis: Redis) -> float:
    """CPU time the Redis server has used so far."""
    info = redis.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table, numbers right-aligned."""
    cells = [[str(h) for h in headers], *[[f"{c:.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in cells]  # fmt: skip
    return "\n".join(lines)


def timed_run(orchestrator: Any, workflow: Any, timeout: float) -> tuple[Any, float, float]:
    """Enqueue a workflow and wait: its result, when enqueue began and when it returned (epoch seconds)."""
    started = time.time()
    handle = orchestrator.enqueue(workflow)
    enqueued = time.time()
    result = handle.wait(timeout=timeout)  # the end is read from the run record, not from polling
    if result.status != "succeeded" or result.finished_at is None:
        raise RuntimeError(f"run {result.id} {result.status}: {result.errors[:3]}")
    return result, started, enqueued


@contextlib.contextmanager
def ours_and_raw(concurrency: int) -> Iterator[tuple[Any, DirectSession, str, list[int]]]:
    """Both sides of a comparison on one broker: an orchestrator worker for `bench`, a raw Celery worker (their
    pids come last, in that order), an orchestrator over them and a direct MCP session; everything stopped at the
    end, even on error."""
    from bench import raw_app  # it reads the raw queue's name from the environment this module sets
    from orchestrator import Orchestrator, load_config

    with scratch(), broker() as url, contextlib.ExitStack() as stack:
        raw_app.use(url, RAW_QUEUE)
        stack.callback(raw_app.release)
        workers = Workers(url)
        stack.callback(workers.stop)
        workers.ours("bench", concurrency)
        workers.raw(concurrency)
        orchestrator = stack.enter_context(Orchestrator(load_config(CONFIG), redis_url=url))
        session = DirectSession()
        stack.callback(session.close)
        yield orchestrator, session, url, workers.pids
