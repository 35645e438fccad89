"""The canary: one unique value is an HTTP server's bearer token (a vault secret), a stdio server's env value
(a vault secret) and a `sensitive` parameter. Workflows run with it — sealed ones, failing ones whose tool
quotes its arguments in the error, a refused token, a crashed server — on workers logging at DEBUG. Then no
sink holds it: not one Flower task, Redis key or value, records row, worker log line, CLI output or Flower answer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from redis import Redis
from sqlalchemy import MetaData, create_engine, select

import celeryconfig
from orchestrator import Orchestrator, RunResult, Workflow, load_config
from orchestrator.errors import RunNotFound
from orchestrator.history.events import buffer_key
from orchestrator.history.records import RecordStore
from orchestrator.security.sealing import PREFIX

from .conftest import (
    ROOT,
    SERVERS,
    BearerServer,
    RecordsDatabase,
    WorkerProcesses,
    free_port,
    vault_home,
    wait_for_port,
)
from .test_vault import redis_values


@dataclass
class Canary:
    """The canary value, an orchestrator over a fleet that holds it, and where the fleet writes."""

    value: str
    orch: Orchestrator
    config: Path
    env: dict[str, str]
    logs: list[Path]
    tokens: Path
    flower: int  # Flower's port
    runs: list[str]

    def run(self, steps: list[dict[str, Any]], **fields: Any) -> RunResult:
        definition = Workflow.model_validate({"id": f"canary-{len(self.runs)}", "steps": steps, **fields})
        handle = self.orch.enqueue(definition, {"pin": self.value})
        self.runs.append(handle.id)
        return handle.wait(60)


@pytest.fixture(scope="module")
def canary(redis_url: str, workers: WorkerProcesses, worker_env: dict[str, str],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Canary]:  # fmt: skip
    home = vault_home(tmp_path_factory.mktemp("canary"), redis_url, worker_env)
    value = f"canary-{uuid.uuid4().hex}"
    home.vault.set("canary-token", value)
    home.vault.set("canary-env", value)
    server = BearerServer(home.path / "tokens", value)
    config = {
        "servers": {
            "canary-http": {"url": server.url, "auth": {"bearer": {"secret": "canary-token"}}},
            "canary-stdio": {"command": "python", "args": [str(SERVERS / "testing.py")],
                        "env": {"CANARY_VALUE": {"secret": "canary-env"}}},
        },
        "services": {"canary-http": {"server": "canary-http", "retries": 0},
                     "canary-stdio": {"server": "canary-stdio", "retries": 1}},
    }  # fmt: skip
    path = home.path / "canary.yaml"
    path.write_text(yaml.safe_dump(config))
    logs = home.path / "worker-logs"
    logs.mkdir()
    pool = WorkerProcesses(home.env, logs)
    pool.start("canary-http", "canary-stdio", config=path, loglevel="DEBUG")
    flower_port = free_port()
    flower = subprocess.Popen([sys.executable, "-m", "celery", "-A", "workers.app", "flower", f"--port={flower_port}",
                               "--address=127.0.0.1"], env={**home.env, "FLOWER_UNAUTHENTICATED_API": "true"}, cwd=ROOT,
                              stdout=(logs / "flower.log").open("wb"), stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_for_port(flower_port, 60)
        with Orchestrator(load_config(path), redis_url=redis_url) as orchestrator:
            found = Canary(value, orchestrator, path, home.env, [logs, Path(home.env["MCPO_HOME"]) / "logs"],
                           server.tokens, flower_port, [])  # fmt: skip
            watch_flower(found)
            yield found
    finally:
        flower.terminate()
        flower.wait(30)
        for name in ("canary-token", "canary-env"):  # the namespace's vault is shared: other rings rotate it
            home.vault.remove(name)
    pool.stop()
    server.stop()


def test_readers_see_sensitive_data_while_no_sink_holds_the_canary(
    canary: Canary, redis_url: str, records_database: RecordsDatabase, worker_env: dict[str, str]
) -> None:
    value = canary.value
    sealed = canary.run([
        {"id": "env", "service": "canary-stdio", "tool": "getenv", "parameters": {"name": "CANARY_VALUE"},
         "depends_on": []},
        {"id": "echo", "service": "canary-stdio", "tool": "echo", "depends_on": ["env"],
         "parameters": {"value": "${ params.pin }", "label": "${ steps.env.output.value }"}},
        {"id": "http", "service": "canary-http", "tool": "echo", "parameters": {"value": "${ params.pin }"},
         "depends_on": ["env"], "use_stale": 60},
    ], sensitive=True, output={"seen": "${ steps.echo.output.value }"})  # fmt: skip
    # Readers with the ring see plaintext: the canary did travel, sealed, through every sink checked below.
    assert sealed.status == "succeeded", sealed.errors
    assert sealed.output == {"seen": value} and sealed.params == {"pin": value}
    assert sealed.steps["env"].output["value"] == value and sealed.steps["echo"].output["label"] == value
    assert sealed.steps["http"].output["value"] == value
    failing = canary.run([
        {"id": "plain", "service": "canary-stdio", "tool": "echo", "parameters": {"value": "plain"}, "depends_on": []},
        {"id": "reject", "service": "canary-stdio", "tool": "reject", "parameters": {"value": "${ params.pin }"},
         "sensitive": True, "retry_tool_errors": True, "depends_on": []},
        {"id": "crash", "service": "canary-stdio", "tool": "crash", "parameters": {"note": "${ params.pin }"},
         "sensitive": True, "depends_on": ["reject"]},
    ])  # fmt: skip
    assert failing.status == "failed" and failing.steps["plain"].output["value"] == "plain"
    rejected = failing.steps["reject"]
    assert rejected.status == "failed" and rejected.attempts == 2 and value in (rejected.error or "")
    assert all(value in attempt.message for attempt in rejected.attempt_errors)
    assert any(value in error.message for error in failing.errors)
    canary.tokens.write_text("nobody-has-this-token\n")
    try:
        refused = canary.run([{"id": "refused", "service": "canary-http", "tool": "echo", "sensitive": True,
                               "parameters": {"value": "${ params.pin }"}}])  # fmt: skip
    finally:
        canary.tokens.write_text(f"{value}\n")
    assert refused.status == "failed" and refused.steps["refused"].error_type == "CredentialRejected"
    crashed = canary.run([{"id": "crash", "service": "canary-stdio", "tool": "crash", "sensitive": True,
                           "parameters": {"note": "${ params.pin }"}}])  # fmt: skip
    assert crashed.status == "failed" and crashed.steps["crash"].attempts == 2

    records = wait_for_records(canary)
    assert any(PREFIX in row for row in records), "sensitive data reached the records sealed"
    cli = [cli_output(canary, worker_env, command, run_id, *options) for run_id in canary.runs
           for command, options in (("status", ["--json"]), ("show", []), ("show", ["--json"]))]  # fmt: skip
    assert "[sealed]" in cli[0] and "[sealed]" in cli[2]  # status --json and show --json of the sealed run
    revealed = cli_output(canary, worker_env, "status", canary.runs[0], "--json", "--reveal")
    assert value in revealed, "a reader asking to reveal sees plaintext"

    flower = flower_tasks(canary.flower)
    shown = [task for task in flower.values() if any(run_id in (task.get("kwargs") or "") for run_id in canary.runs)]
    assert len(shown) >= 6 and any("arguments=[sealed]" in task["kwargs"] for task in shown), "Flower saw the runs"
    found = {
        "flower": json.dumps(flower).count(value),
        "redis": sum(value.encode() in blob for blob in redis_blobs(redis_url)),
        "records": sum(value in row for row in records),
        "logs": {path.name: log.count(value.encode()) for path, log in worker_logs(canary).items()},
        "cli": sum(value in text for text in cli),
    }
    found["logs"] = {name: count for name, count in found["logs"].items() if count}  # type: ignore[union-attr]
    assert found == {"flower": 0, "redis": 0, "records": 0, "logs": {}, "cli": 0}


def wait_for_records(canary: Canary, timeout: float = 60) -> list[str]:
    """Every row of every records table, as text, once every run of the test is there, finished."""
    store = RecordStore(celeryconfig.settings.records_url)
    deadline = time.monotonic() + timeout
    for run_id in canary.runs:
        while True:
            try:
                if store.load(run_id).done:
                    break
            except RunNotFound:
                pass
            assert time.monotonic() < deadline, f"run {run_id} did not reach the records"
            time.sleep(0.2)
    redis = canary.orch.connect().redis
    while redis.llen(buffer_key(celeryconfig.settings.namespace)):
        assert time.monotonic() < deadline, "the records buffer did not drain"
        time.sleep(0.2)
    store.close()
    engine = create_engine(celeryconfig.settings.records_url)
    tables = MetaData()
    tables.reflect(engine)
    with engine.connect() as connection:
        rows = [repr(tuple(row)) for table in tables.sorted_tables for row in connection.execute(select(table))]
    engine.dispose()
    return rows


def redis_blobs(redis_url: str) -> list[bytes]:
    redis = Redis.from_url(redis_url)
    blobs = [blob for key in redis.scan_iter(count=1000) for blob in [key, *redis_values(redis, key)]]
    redis.close()
    assert len(blobs) > 10
    return blobs


def worker_logs(canary: Canary) -> dict[Path, bytes]:
    logs = {path: path.read_bytes() for folder in canary.logs for path in folder.glob("*.log")}
    assert any(b"DEBUG" in log for log in logs.values()), "the workers logged at DEBUG"
    return logs


def cli_output(canary: Canary, env: dict[str, str], command: str, run_id: str, *options: str) -> str:
    args = [sys.executable, "-m", "orchestrator.cli", command, run_id, *options]
    if command == "status":
        args += ["--config", str(canary.config)]
    done = subprocess.run(args, env={**env, **os.environ, **canary.env}, capture_output=True, text=True, cwd=ROOT,
                          timeout=120)  # fmt: skip
    assert done.returncode in (0, 1), done.stderr  # 1: the run failed
    return done.stdout + done.stderr


def flower_tasks(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/tasks", timeout=10) as answer:
        return dict(json.load(answer))


def watch_flower(canary: Canary, timeout: float = 60) -> None:
    """Return once Flower sees the workers' task events (it switches them on when it starts): every later
    call then shows in its API."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        probe = canary.orch.enqueue(Workflow.model_validate({"steps": [
            {"service": "canary-stdio", "tool": "echo", "parameters": {"value": "flower probe"}}]}))  # fmt: skip
        assert probe.wait(60).status == "succeeded"
        time.sleep(0.5)
        if any(probe.id in (task.get("kwargs") or "") for task in flower_tasks(canary.flower).values()):
            return
    raise AssertionError("Flower did not show the workers' calls")
