"""The fleet: workers scale out on one service, shut down gracefully, run on RabbitMQ, show in Flower."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from orchestrator import Orchestrator, RunResult, Workflow
from workers.app import served_queues

from .conftest import ROOT, SERVICES, TEST_SERVICES, WorkerProcesses, free_port, wait_for_port


def fan_out(count: int, seconds: float) -> Workflow:
    return Workflow.model_validate({"id": "fan", "steps": [
        {"id": f"c{i}", "service": "testing", "tool": "concurrent", "parameters": {"seconds": seconds},
         "depends_on": []}
        for i in range(count)
    ]})  # fmt: skip


def alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text()


def test_a_second_worker_shares_the_load_then_shuts_down_gracefully(test_orch: Orchestrator,
                                                                    workers: WorkerProcesses) -> None:  # fmt: skip
    second = workers.start("testing", config=TEST_SERVICES, concurrency=8)
    try:
        # More calls than the first worker's 100 slots: the second takes the rest, with no other change.
        shared = test_orch.enqueue(fan_out(150, 0.5)).wait(90)
        assert shared.status == "succeeded"
        hosts = {step.worker for step in shared.steps.values()}
        assert len(hosts) == 2
        name = next(host for host in hosts if host and f"-{second.pid}@" in host)

        run = test_orch.enqueue(fan_out(12, 3.0))
        deadline = time.monotonic() + 30
        while not any(s.worker == name and s.status == "running" for s in run.status().steps.values()):
            assert time.monotonic() < deadline, "the second worker took no call"
            time.sleep(0.05)
        in_flight = [sid for sid, s in run.status().steps.items() if s.worker == name and s.status == "running"]
        second.send_signal(signal.SIGTERM)  # warm shutdown: in-flight calls finish, then sessions close
        assert second.wait(60) == 0
        result: RunResult = run.wait(90)
        assert result.status == "succeeded", result.errors
        assert all(result.steps[sid].status == "succeeded" and result.steps[sid].worker == name for sid in in_flight)
        server_pids = {result.steps[sid].output["pid"] for sid in in_flight}
        assert server_pids and not any(alive(pid) for pid in server_pids)  # no orphaned MCP server
    finally:  # a failure here must not leave a second worker taking later tests' calls
        if second.poll() is None:
            second.terminate()
            second.wait(30)


# Run in a process of the other namespace: waits until that fleet's broadcast finds its worker serving.
OTHER_FLEET_SEES = """
import os, sys, time
from workers.app import served_queues, use_broker
use_broker(os.environ["REDIS_URL"])
deadline = time.monotonic() + 60
while sys.argv[1] not in served_queues(0.5):
    assert time.monotonic() < deadline, "the other fleet's worker did not answer its own fleet"
"""


def test_fleets_sharing_a_redis_answer_only_their_own_broadcasts(workers: WorkerProcesses,
                                                                 worker_env: dict[str, str]) -> None:  # fmt: skip
    env = {**worker_env, "MCPO_NAMESPACE": f"{worker_env['MCPO_NAMESPACE']}-other"}
    other_queue = f"{env['MCPO_NAMESPACE']}.testing"
    args = [sys.executable, "-m", "orchestrator.cli", "worker", "--config", str(TEST_SERVICES), "--service", "testing"]
    other = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        seen = subprocess.run([sys.executable, "-c", OTHER_FLEET_SEES, other_queue], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=90)  # fmt: skip
        assert seen.returncode == 0, seen.stderr
        assert other_queue not in served_queues(1.0)  # this fleet's broadcast does not reach it
    finally:
        other.terminate()
        other.wait(30)


def test_rabbitmq_as_broker(worker_env: dict[str, str], tmp_path: Path) -> None:
    amqp = os.environ.get("MCPO_TEST_AMQP_URL")
    if not amqp:
        pytest.skip("set MCPO_TEST_AMQP_URL (CI sets the machine's RabbitMQ) to run the fleet on RabbitMQ")
    env = {**worker_env, "MCPO_BROKER_URL": amqp, "MCPO_NAMESPACE": f"{worker_env['MCPO_NAMESPACE']}-amqp"}
    log = (tmp_path / "amqp-worker.log").open("wb")
    worker = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "worker", "--config", str(SERVICES),
                               "--service", "primary", "--service", "fallback"], env=env, cwd=ROOT,
                              stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        done = None
        for _ in range(60):  # until the worker is up: `run` refuses while no worker serves the queues
            done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", "deployment", "--config",
                                   str(SERVICES), "--json"], env=env, cwd=ROOT, capture_output=True, text=True,
                                  timeout=120)  # fmt: skip
            if done.returncode != 2:
                break
            time.sleep(1)
        assert done is not None and done.returncode == 0, (done.stderr if done else "", log.name)
        assert json.loads(done.stdout)["status"] == "succeeded"
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)


def test_flower_shows_finished_calls_by_service_and_tool(test_orch: Orchestrator, worker_env: dict[str, str],
                                                         tmp_path: Path) -> None:  # fmt: skip
    port = free_port()
    env = {**worker_env, "FLOWER_UNAUTHENTICATED_API": "true"}
    log = (tmp_path / "flower.log").open("wb")
    command = [sys.executable, "-m", "celery", "-A", "workers.app", "flower", f"--port={port}", "--address=127.0.0.1"]
    flower = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, 60)
        found: list[dict[str, Any]] = []
        deadline = time.monotonic() + 60
        while not found and time.monotonic() < deadline:  # until Flower has asked the workers for events
            label = f"flower-{time.time_ns()}"
            run = test_orch.enqueue(Workflow.model_validate({"steps": [
                {"service": "testing", "tool": "echo", "parameters": {"label": label}}]}))  # fmt: skip
            assert run.wait(60).status == "succeeded"
            time.sleep(0.5)
            with urllib.request.urlopen(
                f"http://127.0.0.1:{port}/api/tasks?taskname=testing.echo", timeout=10
            ) as answer:
                tasks = json.load(answer)
            found = [t for t in tasks.values() if label in (t.get("kwargs") or "")]
        assert found, f"Flower did not show the call; see {log.name}"
        assert found[0]["state"] == "SUCCESS" and f"run={run.id} step=echo" in found[0]["kwargs"]
    finally:
        flower.terminate()
        flower.wait(30)
