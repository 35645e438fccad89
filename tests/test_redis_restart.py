"""Redis restarted (AOF on) under real worker processes with calls in flight: no worker exits, and the runs in
progress complete once Redis is back, with no call that was completed and acknowledged before the outage made
again."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator import Orchestrator, Workflow

from .conftest import ROOT, TEST_SERVICES, PrivateRedis, WorkerProcesses, worker_fleet

DOWN_FOR = 3.0  # seconds Redis stays down
RECOVERY = 30.0  # the run completes within this many seconds of Redis returning


@pytest.fixture
def fleet(private_redis: PrivateRedis, worker_env: dict[str, str], redis_url: str,
          tmp_path: Path) -> Iterator[tuple[Orchestrator, WorkerProcesses]]:  # fmt: skip
    with worker_fleet(private_redis.url, worker_env, tmp_path, redis_url, concurrency=60) as fleet:
        yield fleet


def _tally(step_id: str, ledger: Path, seconds: float, depends_on: list[str] | None = None) -> dict[str, Any]:
    step: dict[str, Any] = {"id": step_id, "service": "testing", "tool": "tally",
                            "parameters": {"path": str(ledger), "tag": step_id, "seconds": seconds}}  # fmt: skip
    if depends_on is not None:
        step["depends_on"] = depends_on
    return step


def chain(ledger: Path, length: int = 10) -> Workflow:
    return Workflow.model_validate({"id": "chain", "steps": [_tally(f"s{i}", ledger, 0.5) for i in range(length)]})


def fan_out(ledger: Path, width: int = 60) -> Workflow:
    steps = [_tally(f"f{i}", ledger, 2.0, []) for i in range(width)]
    steps.append(_tally("join", ledger, 0, [f"f{i}" for i in range(width)]))
    return Workflow.model_validate({"id": "fanout", "steps": steps})


def calls(ledger: Path) -> list[str]:
    return ledger.read_text().splitlines() if ledger.exists() else []


def restart_midway(orchestrator: Orchestrator, redis: PrivateRedis, workflow: Workflow, ledger: Path,
                   started: int) -> tuple[float, list[str], list[str]]:  # fmt: skip
    """Run workflow, restart Redis once `started` calls are in the ledger; the seconds from Redis returning to
    the run's end, the calls made before the outage, and all calls."""
    run = orchestrator.enqueue(workflow)
    deadline = time.monotonic() + 60
    while len(calls(ledger)) < started and time.monotonic() < deadline:
        time.sleep(0.05)
    before = calls(ledger)
    redis.restart(DOWN_FOR)
    back = time.monotonic()
    result = run.wait(RECOVERY + 30)
    took = time.monotonic() - back
    assert result.status == "succeeded", result
    return took, before, calls(ledger)


def test_a_chain_completes_after_redis_restarts_mid_call(
    fleet: tuple[Orchestrator, WorkerProcesses],
    private_redis: PrivateRedis,
    tmp_path: Path,
) -> None:
    orchestrator, pool = fleet
    ledger = tmp_path / "chain.calls"
    took, before, made = restart_midway(orchestrator, private_redis, chain(ledger), ledger, started=4)
    assert all(process.poll() is None for process in pool.processes), "a worker exited"
    assert took < RECOVERY
    steps = [f"s{i}" for i in range(10)]
    assert sorted(set(made)) == sorted(steps)
    # A call whose successor had started before the outage was completed and acknowledged: it must not repeat.
    acked = before[:-1]
    assert all(made.count(step) == 1 for step in acked), made
    print(f"chain: {took:.1f} s after Redis returned; {len(made) - len(steps)} duplicate calls")


def test_a_fan_out_followed_by_the_command_line_completes_after_redis_restarts(
    fleet: tuple[Orchestrator, WorkerProcesses],
    private_redis: PrivateRedis,
    worker_env: dict[str, str],
    tmp_path: Path,
) -> None:
    """`mcp-orchestrator run` follows a 60-wide fan-out through the restart and exits 0 once the run ends."""
    pool = fleet[1]
    ledger = tmp_path / "fanout.calls"
    workflow = tmp_path / "fanout.yaml"
    workflow.write_text(yaml.safe_dump(fan_out(ledger).model_dump(by_alias=True, exclude_none=True)))
    args = [sys.executable, "-m", "orchestrator.cli", "run", str(workflow), "--config", str(TEST_SERVICES)]
    follower = subprocess.Popen(args, env={**worker_env, "REDIS_URL": private_redis.url}, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 60
    while len(calls(ledger)) < 30 and time.monotonic() < deadline:
        time.sleep(0.05)
    private_redis.restart(DOWN_FOR)
    back = time.monotonic()
    _, err = follower.communicate(timeout=RECOVERY + 30)
    took = time.monotonic() - back
    assert follower.returncode == 0, err.decode()[-2000:]
    assert all(process.poll() is None for process in pool.processes), "a worker exited"
    assert took < RECOVERY
    made = calls(ledger)
    steps = [f"f{i}" for i in range(60)] + ["join"]
    assert sorted(set(made)) == sorted(steps)
    assert made.count("join") == 1
    print(f"fan-out: {took:.1f} s after Redis returned; {len(made) - len(steps)} duplicate calls")
