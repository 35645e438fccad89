"""Resilience end to end: real worker processes, real Redis, MCP servers that fail on purpose."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from redis import Redis

from orchestrator import Orchestrator, RunResult, Workflow, load_config
from orchestrator.breaker import CircuitBreaker

from .conftest import ROOT, TEST_SERVICES, WorkerProcesses

BREAKER = {"window_size": 4, "minimum_calls": 4, "failure_rate_threshold": 50, "wait_in_open": 3,
           "permitted_calls_in_half_open": 2}  # fmt: skip


@dataclass
class Faulty:
    """The faulty server's controls, and an orchestrator over it and the testing service."""

    orch: Orchestrator
    state: Path
    breaker: CircuitBreaker
    config: Path

    def set(self, mode: str, **options: Any) -> None:
        self.state.write_text(json.dumps({"mode": mode, **options}))
        self.state.with_suffix(".calls").write_text("")

    def calls(self) -> int:
        return len(self.state.with_suffix(".calls").read_text().splitlines())

    def run(self, steps: list[dict[str, Any]], params: dict[str, Any] | None = None, timeout: float = 90) -> RunResult:
        workflow = Workflow.model_validate({"id": "faulty", "steps": steps})
        return self.orch.enqueue(workflow, params).wait(timeout)


@pytest.fixture(scope="module")
def faulty(redis_url: str, workers: WorkerProcesses, test_orch: Orchestrator,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Faulty]:  # fmt: skip
    """Two worker processes serving the `faulty` service, whose breaker opens after 2 failures of 4 calls."""
    home = tmp_path_factory.mktemp("faulty")
    state = home / "state.json"
    config = yaml.safe_load(TEST_SERVICES.read_text())
    config["servers"]["testing"]["args"] = [str(ROOT / "tests" / "servers" / "testing.py")]
    config["servers"]["faulty"] = {"command": "python", "args": [str(ROOT / "tests" / "servers" / "faulty.py")],
                                   "env": {"FAULTY_STATE": str(state)}}  # fmt: skip
    config["services"]["faulty"] = {
        "server": "faulty",
        "tools": ["work"],
        "timeout": 20,
        "retries": 1,
        "breaker": BREAKER,
    }
    config["workflows"] = {
        "risky": {"steps": [{"id": "deploy", "service": "faulty", "tool": "work", "parameters": {"x": "${ params.x }"},
                             "retries": 0}], "fallback": "safe"},
        "safe": {"steps": [{"id": "basic", "service": "testing", "tool": "echo",
                            "parameters": {"value": "${ params.x }"}}]},
    }  # fmt: skip
    path = home / "faulty.yaml"
    path.write_text(yaml.safe_dump(config))
    loaded = load_config(path)
    workers.start_each([("faulty",), ("faulty",)], config=path)
    with Orchestrator(loaded, redis_url=redis_url) as orchestrator:
        namespace = orchestrator.connect().namespace
        breaker = CircuitBreaker.of(
            Redis.from_url(redis_url), namespace, "faulty", "faulty", loaded.services["faulty"].breaker
        )
        yield Faulty(orchestrator, state, breaker, path)


@pytest.fixture
def fresh(faulty: Faulty) -> Faulty:
    faulty.breaker.reset()
    faulty.set("ok")
    return faulty


def work(step_id: str, **options: Any) -> dict[str, Any]:
    return {"id": step_id, "service": "faulty", "tool": "work", "parameters": {"x": step_id}, "depends_on": [],
            **options}  # fmt: skip


def test_transient_faults_are_retried_immediately_then_with_backoff(fresh: Faulty, workers: WorkerProcesses) -> None:
    fresh.set("crash_first", n=2)
    result = fresh.run([work("w", retries=3)])
    step = result.steps["w"]
    assert result.status == "succeeded", result.errors
    assert step.attempts == 3 and [e.type for e in step.attempt_errors] == ["TransportError", "TransportError"]
    assert step.output["x"] == "w"
    logs = "".join(p.read_text(errors="replace") for p in workers.log_dir.glob("worker-faulty-*.log"))
    assert "Retry in" in logs  # the second retry waited in the broker, not in a worker slot
    assert result.error_summary == {"faulty": {"TransportError": 2}}


def test_tool_errors_are_retried_only_when_the_step_asks(fresh: Faulty) -> None:
    fresh.set("error")
    plain = fresh.run([work("w", retries=2)])
    assert plain.steps["w"].attempts == 1 and plain.steps["w"].error_type == "ToolError"
    asked = fresh.run([work("w", retries=2, retry_tool_errors=True)])
    assert asked.steps["w"].attempts == 3 and asked.status == "failed"


def test_timeout_cancels_the_call_on_the_server_and_the_worker_stays_healthy(test_orch: Orchestrator) -> None:
    tag = uuid.uuid4().hex
    steps = [
        {"id": "h", "service": "testing", "tool": "hang", "parameters": {"tag": tag}, "timeout": 1.5, "retries": 0}
    ]
    result = test_orch.enqueue(Workflow.model_validate({"steps": steps})).wait(60)
    assert result.steps["h"].status == "failed" and result.steps["h"].error_type == "StepTimeout"
    after = test_orch.enqueue(Workflow.model_validate({"steps": [{"service": "testing", "tool": "cancelled"}]})).wait(
        60
    )
    assert tag in after.steps["cancelled"].output["result"]  # the server was told: MCP cancellation


def test_breaker_opens_refuses_half_opens_and_closes_across_two_workers(fresh: Faulty) -> None:
    fresh.set("crash")
    # One call a run: each crash is a server process of its own, and counts (the calls one crash fails count once).
    for i in range(BREAKER["minimum_calls"]):
        opened = fresh.run([work(f"f{i}", retries=0)])
        assert opened.status == "failed" and opened.steps[f"f{i}"].error_type == "TransportError"
    assert fresh.breaker.snapshot().state == "open"

    fresh.set("crash")
    refused = fresh.run([work(f"r{i}", retries=0) for i in range(16)])
    assert fresh.calls() == 0  # no MCP traffic while open
    assert {s.error_type for s in refused.steps.values()} == {"CircuitOpen"}
    assert "circuit breaker for faulty/faulty is open; refusing calls until" in (refused.steps["r0"].error or "")
    assert len({s.worker for s in refused.steps.values()}) == 2  # both worker processes see the shared state

    fresh.set("ok")  # the server recovers; after the wait, trials go through and close the breaker
    time.sleep(BREAKER["wait_in_open"] + 0.5)
    trial = fresh.run([work(f"t{i}", retries=0) for i in range(6)])
    statuses = sorted(s.status for s in trial.steps.values())
    assert statuses.count("succeeded") >= BREAKER["permitted_calls_in_half_open"]
    assert fresh.breaker.snapshot().state == "closed"
    closed = fresh.run([work(f"c{i}", retries=0) for i in range(6)])
    assert closed.status == "succeeded"


def test_a_skipped_step_leaves_the_half_open_trials_to_calls_that_are_made(fresh: Faulty) -> None:
    for _ in range(BREAKER["minimum_calls"]):
        fresh.breaker.record(fresh.breaker.acquire(), True, 0.1)
    assert fresh.breaker.snapshot().state == "open"
    time.sleep(BREAKER["wait_in_open"] + 0.5)
    # The worker asks the breaker while it reads a step's inputs, before the condition is known.
    skipped = fresh.run([work("skipped", when="params.go")], {"go": False})
    assert skipped.steps["skipped"].skip_reason == "condition" and fresh.breaker.snapshot().state == "half_open"
    trials = [work(f"t{i}", retries=0, depends_on=[f"t{i - 1}"] if i else []) for i in range(2)]
    result = fresh.run(trials)
    assert result.status == "succeeded", result.errors  # both permitted trials were left for these calls
    assert fresh.breaker.snapshot().state == "closed"


def test_fallback_service_takes_the_call_and_keeps_its_place(fresh: Faulty) -> None:
    fresh.set("crash")
    fallback = {"service": "testing", "tool": "echo", "parameters": {"value": "from fallback"}}
    result = fresh.run([
        work("primary", retries=1, fallback=fallback),
        {"id": "next", "service": "testing", "tool": "echo", "parameters": {"value": "${ steps.primary.output.value }"},
         "depends_on": ["primary"]},
    ])  # fmt: skip
    assert result.status == "succeeded", result.errors
    step = result.steps["primary"]
    assert step.served_by == "testing.echo" and step.output["value"] == "from fallback"
    assert step.attempts == 3 and [e.service for e in step.attempt_errors] == ["faulty", "faulty"]
    assert result.steps["next"].output["value"] == "from fallback"
    assert [(e.step, e.handled_by) for e in result.errors] == [("primary", "fallback")]


def test_stale_answer_when_the_service_is_down(fresh: Faulty) -> None:
    step = work("cached", retries=0, use_stale=600)
    first = fresh.run([step])
    assert first.steps["cached"].status == "succeeded"
    fresh.set("crash")
    second = fresh.run([step])
    cached = second.steps["cached"]
    assert second.status == "succeeded"
    assert cached.status == "stale-cache" and cached.output == first.steps["cached"].output
    assert cached.stale_age_s is not None and cached.stale_age_s > 0
    assert [e.handled_by for e in second.errors] == ["stale-cache"]


def test_optional_step_degrades_and_the_run_goes_on(fresh: Faulty) -> None:
    fresh.set("crash")
    result = fresh.run([
        work("extra", retries=0, optional=True),
        {"id": "main", "service": "testing", "tool": "echo", "parameters": {"value": "${ steps.extra.output }"},
         "depends_on": ["extra"]},
    ])  # fmt: skip
    assert result.status == "succeeded"
    assert result.steps["extra"].status == "degraded" and result.steps["extra"].error_type == "TransportError"
    assert result.steps["main"].status == "succeeded" and result.steps["main"].output["value"] is None
    assert [(e.step, e.handled_by) for e in result.errors] == [("extra", "degraded")]


def echo(step_id: str, deps: list[str], **options: Any) -> dict[str, Any]:
    return {"id": step_id, "service": "testing", "tool": "echo", "parameters": {"value": step_id}, "depends_on": deps,
            **options}  # fmt: skip


def test_conditions_choose_branches_at_run_time(test_orch: Orchestrator) -> None:
    workflow = Workflow.model_validate({"id": "branches", "steps": [
        echo("check", []),
        echo("prod", ["check"], when="params.env == 'production'"),
        echo("staging", ["check"], when="${ params.env != 'production' && steps.check.status == 'succeeded' }"),
        echo("after_prod", ["prod"]),
        echo("join", ["prod", "staging"]),
    ]})  # fmt: skip
    result = test_orch.enqueue(workflow, {"env": "staging"}).wait(60)
    assert result.status == "succeeded", result.errors
    assert {k: (s.status, s.skip_reason) for k, s in result.steps.items()} == {
        "check": ("succeeded", None), "prod": ("skipped", "condition"), "staging": ("succeeded", None),
        "after_prod": ("skipped", "condition"), "join": ("succeeded", None),
    }  # fmt: skip
    production = test_orch.enqueue(workflow, {"env": "production"}).wait(60)
    assert production.steps["prod"].status == "succeeded" and production.steps["staging"].status == "skipped"


def test_a_condition_that_fails_at_run_time_fails_its_step_and_the_run_ends(test_orch: Orchestrator) -> None:
    # length() of a number parses, and fails only once evaluated: a worker-side error, not a compile-time one.
    workflow = Workflow.model_validate({"id": "bad-condition", "steps": [
        echo("check", []), echo("odd", ["check"], when="length(params.n) > `1`"), echo("after", ["check"]),
    ]})  # fmt: skip
    result = test_orch.enqueue(workflow, {"n": 5}).wait(60)
    assert result.status == "failed"
    odd = result.steps["odd"]
    assert (odd.status, odd.error_type) == ("failed", "ExpressionError")
    assert "field 'when'" in (odd.error or "") and "length" in (odd.error or "")
    assert result.steps["after"].status == "succeeded"


def test_cancel_stops_the_run_and_cancels_in_flight_calls(test_orch: Orchestrator) -> None:
    tag = uuid.uuid4().hex
    workflow = Workflow.model_validate({"id": "long", "steps": [
        echo("quick", []),
        {"id": "hang", "service": "testing", "tool": "hang", "parameters": {"tag": tag}, "depends_on": ["quick"]},
        echo("never", ["hang"]),
    ]})  # fmt: skip
    run = test_orch.enqueue(workflow)
    deadline = time.monotonic() + 30
    while run.status().steps["hang"].status != "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # the call is in flight on the server
    assert test_orch.cancel(run.id).status == "cancelled"
    while not run.status().steps["never"].done and time.monotonic() < deadline:
        time.sleep(0.05)
    result = run.status()
    assert result.status == "cancelled"
    assert {k: s.status for k, s in result.steps.items()} == {"quick": "succeeded", "hang": "cancelled",
                                                              "never": "cancelled"}  # fmt: skip
    assert result.steps["quick"].output["value"] == "quick"  # what had finished is kept
    seen = test_orch.enqueue(Workflow.model_validate({"steps": [{"service": "testing", "tool": "cancelled"}]})).wait(60)
    assert tag in seen.steps["cancelled"].output["result"]


def test_a_failed_branch_loses_no_other_branch_and_errors_are_summarised(test_orch: Orchestrator) -> None:
    workflow = Workflow.model_validate({"id": "branches", "steps": [
        echo("a", []), echo("b", []),
        {"id": "bad", "service": "testing", "tool": "fail", "depends_on": []},
        echo("join", ["a", "b", "bad"]),
    ]})  # fmt: skip
    result = test_orch.enqueue(workflow).wait(60)
    assert result.status == "failed"
    assert {k: s.status for k, s in result.steps.items()} == {"a": "succeeded", "b": "succeeded", "bad": "failed",
                                                              "join": "skipped"}  # fmt: skip
    assert result.steps["a"].output["value"] == "a" and result.steps["b"].output["value"] == "b"
    assert [(e.step, e.service, e.instance, e.type, e.attempts) for e in result.errors] == [
        ("bad", "testing", "testing", "ToolError", 1)
    ]
    assert result.error_summary == {"testing": {"ToolError": 1}}


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=env, capture_output=True, text=True,
                          timeout=60, cwd=ROOT)  # fmt: skip


def test_services_shows_each_breaker(fresh: Faulty, worker_env: dict[str, str]) -> None:
    opened = time.time()
    for _ in range(4):
        fresh.breaker.record(fresh.breaker.acquire(), True, 0.1)
    shown = cli(worker_env, "services", "--config", str(fresh.config), "--json")
    assert shown.returncode == 0, shown.stderr
    states = {s["service"]: s for s in json.loads(shown.stdout)}
    assert states["faulty"]["breaker"] == "open" and states["faulty"]["failure_rate"] == 100.0
    assert states["faulty"]["retry_at"] == pytest.approx(opened + BREAKER["wait_in_open"], abs=1.0)
    assert states["testing"]["breaker"] == "closed"
    table = cli(worker_env, "services", "--config", str(fresh.config))
    assert any(
        line.split()[:2] == ["faulty", "faulty"] and "open" in line.split() for line in table.stdout.splitlines()
    )


def test_cancel_from_the_command_line(test_orch: Orchestrator, worker_env: dict[str, str]) -> None:
    workflow = Workflow.model_validate(
        {"steps": [{"service": "testing", "tool": "hang", "parameters": {"seconds": 30}}]}
    )
    run = test_orch.enqueue(workflow)
    done = cli(worker_env, "cancel", run.id)
    assert done.returncode == 0 and done.stdout.strip() == f"run {run.id} cancelled"
    assert run.wait(30).status == "cancelled"
    again = cli(worker_env, "cancel", "no-such-run")
    assert again.returncode == 2 and "run no-such-run is not known" in again.stderr


def test_failed_workflow_runs_its_fallback_workflow(fresh: Faulty) -> None:
    fresh.set("crash")
    result = fresh.orch.enqueue("risky", {"x": "v1"}).wait(90)
    assert result.status == "succeeded" and result.fallback_run
    assert result.steps["deploy"].status == "failed"
    assert result.output == {"basic": fresh.orch.status(result.fallback_run).steps["basic"].output}
    assert result.output["basic"]["value"] == "v1"
    assert [(e.step, e.handled_by) for e in result.errors] == [("deploy", "fallback-workflow")]
    fallback = fresh.orch.status(result.fallback_run)
    assert fallback.workflow == "safe" and fallback.status == "succeeded"
    fresh.set("ok")
    healthy = fresh.orch.enqueue("risky", {"x": "v2"}).wait(90)
    assert healthy.status == "succeeded" and healthy.fallback_run is None
