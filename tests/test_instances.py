"""Several instances of one service: least-in-flight balancing, failover, health beats, run-time registration."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import select

from orchestrator import Orchestrator, RunResult, Workflow, load_config
from orchestrator.history.flusher import Flusher
from orchestrator.history.records import RecordStore
from orchestrator.history.tables import AuditRecord
from orchestrator.results import InstanceStatus

from .conftest import ROOT, TEST_SERVICES, RecordsDatabase, WorkerProcesses, free_port

SERVERS = ROOT / "tests" / "servers"


@dataclass
class Fleet:
    orch: Orchestrator
    config: Path
    states: dict[str, Path]

    def set(self, instance: str, mode: str, **options: Any) -> None:
        self.states[instance].write_text(json.dumps({"mode": mode, **options}))

    def fan_out(self, service: str, tool: str, count: int, parameters: dict[str, Any], **step: Any) -> RunResult:
        workflow = Workflow.model_validate({"id": "fan", "steps": [
            {"id": f"c{i}", "service": service, "tool": tool, "parameters": parameters, "depends_on": [], **step}
            for i in range(count)
        ]})  # fmt: skip
        return self.orch.enqueue(workflow).wait(90)

    def instances(self, service: str) -> dict[str, InstanceStatus]:
        return {s.instance: s for s in self.orch.fleet.services() if s.service == service}


def served_by(result: RunResult) -> Counter[str | None]:
    return Counter(step.instance for step in result.steps.values())


@pytest.fixture(scope="module")
def fleet(records_database: RecordsDatabase, redis_url: str, workers: WorkerProcesses, test_orch: Orchestrator,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:  # fmt: skip
    """`pair`: two faulty servers (fa, fb) set per test; `echoes`: one testing server, more registered by tests;
    `gone`: two instances that never answer. The workers serve them from one process, and keep their records
    in the session's records database."""
    home = tmp_path_factory.mktemp("instances")
    states = {name: home / f"{name}.json" for name in ("fa", "fb")}
    config = yaml.safe_load(TEST_SERVICES.read_text())
    config["servers"]["testing"]["args"] = [str(SERVERS / "testing.py")]
    for name, state in states.items():
        config["servers"][name] = {"command": "python", "args": [str(SERVERS / "faulty.py")],
                                   "env": {"FAULTY_STATE": str(state)}}  # fmt: skip
    closed = [free_port(), free_port()]
    config["servers"]["g1"] = {"url": f"http://127.0.0.1:{closed[0]}/mcp"}
    config["servers"]["g2"] = {"url": f"http://127.0.0.1:{closed[1]}/mcp"}
    health = {"interval": 1, "timeout": 5, "avoid_after_failure": 30}
    config["services"].update({
        "pair": {"instances": ["fa", "fb"], "tools": ["work"], "timeout": 20, "retries": 2, "health": health},
        "echoes": {"instances": ["testing"], "timeout": 20, "retries": 1, "health": health},
        "gone": {"instances": ["g1", "g2"], "timeout": 5, "retries": 0, "health": health},
    })  # fmt: skip
    path = home / "instances.yaml"
    path.write_text(yaml.safe_dump(config))
    workers.start("pair", "echoes", "gone", config=path)
    with Orchestrator(load_config(path), redis_url=redis_url) as orchestrator:
        yield Fleet(orchestrator, path, states)


def test_calls_spread_over_instances_by_least_in_flight(fleet: Fleet) -> None:
    fleet.set("fa", "slow", delay=0.3)
    fleet.set("fb", "slow", delay=0.3)
    result = fleet.fan_out("pair", "work", 20, {"x": 1})
    assert result.status == "succeeded", result.errors
    counts = served_by(result)
    assert set(counts) == {"fa", "fb"}
    assert min(counts.values()) >= 5, counts  # balanced, not all on one


def test_a_call_that_fails_on_one_instance_is_retried_on_the_other(fleet: Fleet) -> None:
    fleet.set("fa", "ok")
    fleet.set("fb", "crash")
    result = fleet.fan_out("pair", "work", 8, {"x": 2})
    assert result.status == "succeeded", result.errors
    assert set(served_by(result)) == {"fa"}
    failed_over = [step for step in result.steps.values() if step.attempt_errors]
    assert failed_over, "no call reached fb: the test proves nothing"
    for step in failed_over:
        assert [e.instance for e in step.attempt_errors] == ["fb"] and step.instance == "fa"
    # fb is avoided for a while after failing: the calls after the first failures all went to fa directly
    later = fleet.fan_out("pair", "work", 6, {"x": 3})
    assert set(served_by(later)) == {"fa"} and not any(s.attempt_errors for s in later.steps.values())


def test_health_beats_show_status_latency_and_tools_and_keep_down_instances_out(
    fleet: Fleet, http_server: Callable[..., str]
) -> None:
    url = http_server(str(SERVERS / "testing.py"))
    fleet.orch.fleet.register("echoes", "remote", url)
    fleet.orch.fleet.register("echoes", "nowhere", f"http://127.0.0.1:{free_port()}/mcp")
    fleet.orch.fleet.discover(["echoes"])  # a health beat, now
    states = fleet.instances("echoes")
    assert {name: s.health for name, s in states.items()} == {"testing": "up", "remote": "up", "nowhere": "down"}
    assert states["remote"].registered and not states["testing"].registered
    assert states["remote"].latency_ms is not None and states["remote"].tools == states["testing"].tools > 5
    assert states["nowhere"].last_seen is None and states["nowhere"].calls == 1  # the failed beat fed its breaker

    result = fleet.fan_out("echoes", "concurrent", 12, {"seconds": 0.3})
    assert result.status == "succeeded", result.errors
    assert set(served_by(result)) == {"testing", "remote"}  # never the instance whose beat failed

    fleet.orch.fleet.deregister("echoes", "remote")
    fleet.orch.fleet.deregister("echoes", "nowhere")
    after = fleet.fan_out("echoes", "concurrent", 6, {"seconds": 0.1})
    assert set(served_by(after)) == {"testing"}
    assert set(fleet.instances("echoes")) == {"testing"}


def test_when_every_instance_is_down_the_step_goes_to_its_fallback(fleet: Fleet) -> None:
    fleet.orch.fleet.discover(["gone"])
    assert {s.health for s in fleet.instances("gone").values()} == {"down"}
    workflow = Workflow.model_validate({"id": "gone", "steps": [
        {"id": "call", "service": "gone", "tool": "anything", "parameters": {"value": 1},
         "fallback": {"service": "testing", "tool": "echo"}},
    ]})  # fmt: skip
    result = fleet.orch.enqueue(workflow).wait(60)
    assert result.status == "succeeded", result.errors
    step = result.steps["call"]
    assert step.served_by == "testing.echo" and step.output["value"] == 1
    assert "no healthy instance of service 'gone'" in step.attempt_errors[0].message


def test_celery_beat_schedules_health_beats_on_each_service_queue(fleet: Fleet, worker_env: dict[str, str],
                                                                  tmp_path: Path) -> None:  # fmt: skip
    before = fleet.instances("pair")["fa"].last_seen or 0.0
    log = (tmp_path / "beat.log").open("wb")
    beat = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "beat", "--config", str(fleet.config)],
                            env={**worker_env, "MCPO_HOME": str(tmp_path)}, cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while (fleet.instances("pair")["fa"].last_seen or 0.0) <= before:
            assert beat.poll() is None and time.monotonic() < deadline, f"no beat arrived; see {log.name}"
            time.sleep(0.2)
        history = fleet.orch.fleet.health_history("pair", "fa")
        assert history[0].status == "up" and history[0].tools == 1
    finally:
        beat.terminate()
        beat.wait(30)


def test_register_and_deregister_from_the_command_line(fleet: Fleet, worker_env: dict[str, str]) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "orchestrator.cli", *args, "--config", str(fleet.config)]
        return subprocess.run(command, env=worker_env, cwd=ROOT, capture_output=True, text=True, timeout=60)

    added = cli("register", "echoes", "extra", "--url", "http://127.0.0.1:9/mcp")
    assert added.returncode == 0, added.stderr
    listing = cli("services")
    assert listing.returncode == 0 and "extra*" in listing.stdout and "registered at run time" in listing.stdout
    assert cli("deregister", "echoes", "extra").returncode == 0
    again = cli("deregister", "echoes", "extra")
    assert again.returncode == 2 and "has no instance 'extra' registered" in again.stderr
    clash = cli("register", "echoes", "fa", "--url", "http://127.0.0.1:9/mcp")
    assert clash.returncode == 2 and "is a server of the configuration" in clash.stderr


def test_health_history_and_registrations_reach_the_records(fleet: Fleet, records_database: RecordsDatabase) -> None:
    fleet.orch.fleet.register("echoes", "audited", "http://user:pw@127.0.0.1:9/mcp?key=k")
    fleet.orch.fleet.discover(["echoes"])
    fleet.orch.fleet.deregister("echoes", "audited")
    store = RecordStore(records_database.url)
    Flusher(fleet.orch.connect().redis, fleet.orch.connect().namespace, store).flush(60)
    assert [beat.status for beat in store.health("echoes", "audited")] == ["down"]
    assert store.health("echoes", "testing")[0].status == "up"
    with store.session() as session:
        rows = session.scalars(select(AuditRecord).where(AuditRecord.instance == "audited").order_by(AuditRecord.seq))
        audited = [(row.action, row.service, row.detail) for row in rows]
    assert [action for action, _, _ in audited] == ["register", "deregister"]
    assert audited[0][1] == "echoes" and "127.0.0.1:9/mcp" in (audited[0][2] or "")
    assert "pw" not in (audited[0][2] or "") and "key=k" not in (audited[0][2] or "")  # no credentials kept


def test_the_fleet_methods_old_names_still_work_with_a_deprecation_warning(fleet: Fleet) -> None:
    with pytest.warns(DeprecationWarning, match=r"Orchestrator.services\(\) is now Orchestrator.fleet.services\(\)"):
        old = fleet.orch.services()
    assert [(s.service, s.instance) for s in old] == [(s.service, s.instance) for s in fleet.orch.fleet.services()]
    with pytest.warns(DeprecationWarning, match="fleet.health_history"):
        assert all(beat.status in ("up", "down") for beat in fleet.orch.health_history("pair", "fa"))
    with pytest.warns(DeprecationWarning, match=r"Orchestrator.store is deprecated: use Orchestrator.connect\(\)"):
        assert fleet.orch.store is fleet.orch.connect()
