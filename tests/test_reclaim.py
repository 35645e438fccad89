"""Fast reclaim: a SIGKILLed worker's calls go back to their queues within seconds, at the default visibility
timeout, and another worker runs them; a live worker's slow calls stay with it."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from redis import Redis

import celeryconfig
from orchestrator import Orchestrator

from .conftest import PrivateRedis, WorkerProcesses, worker_fleet

HEARTBEAT = os.environ.get("MCPO_TEST_HEARTBEAT", "0.5")  # README figures are measured at 2 too


@pytest.fixture
def fleet(
    worker_env: dict[str, str], redis_url: str, tmp_path: Path
) -> Iterator[tuple[Orchestrator, WorkerProcesses, Redis]]:
    """Two workers on the `testing` service over a Redis of this test's own, beating every 0.5 s; the
    visibility timeout is the default (3600 s)."""
    private = PrivateRedis(tmp_path / "redis").start()
    env = {**worker_env, "MCPO_HEARTBEAT_INTERVAL": HEARTBEAT}
    env.pop("MCPO_VISIBILITY_TIMEOUT", None)
    try:
        with worker_fleet(private.url, env, tmp_path, redis_url) as (orchestrator, workers):
            yield orchestrator, workers, Redis.from_url(private.url)
    finally:
        private.stop(signal.SIGKILL)


def _workflow(path: Path, ledger: Path, steps: list[dict[str, object]]) -> Path:
    for step in steps:
        step.update(service="testing", tool="tally")
        step["parameters"] = {"path": str(ledger), "tag": step["id"], "seconds": step.pop("seconds")}
    path.write_text(yaml.safe_dump({"id": path.stem, "steps": steps}))
    return path


def _holdings(redis: Redis) -> dict[int, int]:
    """Each live worker's pid and the calls it holds (reserved or running), from its heartbeat: a batch message
    holds as many as its name says (`service.tool`, a multiplication sign, N)."""
    namespace = celeryconfig.settings.namespace
    held: dict[int, int] = {}
    for raw in redis.zrange(f"{namespace}:workers", 0, -1):
        worker = raw.decode() if isinstance(raw, bytes) else str(raw)
        tags = list(redis.smembers(f"{namespace}:worker:{worker}:tags"))
        entries = [entry for entry in (redis.hmget("unacked", tags) if tags else []) if entry is not None]
        held[int(worker.split(":")[1])] = sum(_calls(json.loads(entry)[0]["headers"]) for entry in entries)
    return held


def _calls(headers: dict[str, object]) -> int:
    count = str(headers.get("shadow") or "").rpartition("\N{MULTIPLICATION SIGN}")[2]
    return int(count) if count.isdigit() else 1


def _kill_holder(workers: WorkerProcesses, redis: Redis) -> int:
    """SIGKILL the worker holding the most calls; the number it held."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        held = _holdings(redis)
        if held and max(held.values()) > 0:
            pid = max(held, key=lambda p: held[p])
            (process,) = [p for p in workers.processes if p.pid == pid]
            process.send_signal(signal.SIGKILL)
            process.wait(10)
            return held[pid]
        time.sleep(0.05)
    raise AssertionError("no worker held a call within 30 s")


def _lines(ledger: Path) -> int:
    return len(ledger.read_text().split()) if ledger.exists() else 0


def _run_and_kill(fleet: tuple[Orchestrator, WorkerProcesses, Redis], workflow: Path, ledger: Path,
                  started: int) -> tuple[float, int, Counter[str]]:  # fmt: skip
    orchestrator, workers, redis = fleet
    run = orchestrator.enqueue(workflow)
    deadline = time.monotonic() + 30
    while _lines(ledger) < started and time.monotonic() < deadline:  # calls are under way on the server
        time.sleep(0.05)
    held = _kill_holder(workers, redis)
    killed = time.monotonic()
    before = _lines(ledger)
    while time.monotonic() < killed + 30 and _lines(ledger) <= before:
        time.sleep(0.05)
    resumed = time.monotonic() - killed  # the next call begins: a cut-off call re-run, or the next step
    result = run.wait(timeout=60)
    took = time.monotonic() - killed
    assert result.status == "succeeded", result.errors
    calls = Counter(ledger.read_text().split())
    twice = sum(count - 1 for count in calls.values())
    print(
        f"heartbeat {HEARTBEAT} s: calls again {resumed:.1f} s, done {took:.1f} s after the kill; "
        f"{twice} calls twice, {held} held"
    )
    return took, held, calls


def test_killed_worker_mid_chain_is_reclaimed(fleet: tuple[Orchestrator, WorkerProcesses, Redis],
                                              tmp_path: Path) -> None:  # fmt: skip
    ledger = tmp_path / "ledger"
    steps: list[dict[str, object]] = [{"id": f"s{i}", "seconds": 1.0} for i in range(10)]
    took, held, calls = _run_and_kill(fleet, _workflow(tmp_path / "chain.yaml", ledger, steps), ledger, 3)
    assert set(calls) == {f"s{i}" for i in range(10)}
    twice = sum(count - 1 for count in calls.values())
    assert twice <= held, f"{twice} calls made twice, the killed worker held {held}: {calls}"
    assert took < 20 + 10 * 1.0, f"the chain ended {took:.1f} s after the kill"


def test_killed_worker_mid_fanout_is_reclaimed(fleet: tuple[Orchestrator, WorkerProcesses, Redis],
                                               tmp_path: Path) -> None:  # fmt: skip
    ledger = tmp_path / "ledger"
    steps: list[dict[str, object]] = [{"id": f"f{i}", "seconds": 2.0, "depends_on": []} for i in range(50)]
    took, held, calls = _run_and_kill(fleet, _workflow(tmp_path / "fanout.yaml", ledger, steps), ledger, 1)
    assert set(calls) == {f"f{i}" for i in range(50)}
    twice = sum(count - 1 for count in calls.values())
    assert twice <= held, f"{twice} calls made twice, the killed worker held {held}: {calls}"
    assert took < 20, f"the fan-out ended {took:.1f} s after the kill"


def test_slow_live_worker_keeps_its_calls(fleet: tuple[Orchestrator, WorkerProcesses, Redis],
                                          tmp_path: Path) -> None:  # fmt: skip
    """A call 12 heartbeats long on a live worker is not handed to the other worker."""
    orchestrator, _, _ = fleet
    ledger = tmp_path / "ledger"
    steps: list[dict[str, object]] = [{"id": f"slow{i}", "seconds": 6.0, "depends_on": []} for i in range(4)]
    result = orchestrator.enqueue(_workflow(tmp_path / "slow.yaml", ledger, steps)).wait(timeout=60)
    assert result.status == "succeeded", result.errors
    assert Counter(ledger.read_text().split()) == {f"slow{i}": 1 for i in range(4)}
