"""End to end: workflows through separate worker processes to real MCP servers (stdio and HTTP)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator import BrokerError, Orchestrator, RunResult, Workflow, load_config

from .conftest import EXAMPLES, ROOT, WorkerProcesses


def dag(spec: dict[str, list[str]], params: dict[str, dict[str, Any]] | None = None) -> Workflow:
    """A DAG of `testing.echo` steps; each echoes its own id unless params say otherwise."""
    params = params or {}
    steps = [
        {"id": step, "service": "testing", "tool": "echo", "depends_on": deps,
         "parameters": params.get(step, {"value": step})}
        for step, deps in spec.items()
    ]  # fmt: skip
    return Workflow.model_validate({"id": "dag", "steps": steps})


def ran(result: RunResult) -> dict[str, str]:
    return {step_id: step.status for step_id, step in result.steps.items()}


def assert_order(result: RunResult, before: str, after: str) -> None:
    first, second = result.steps[before], result.steps[after]
    assert first.finished_at is not None and second.started_at is not None
    assert first.finished_at <= second.started_at, f"{after} started before {before} finished"


def test_seed_deployment_chain_with_data_flow(orch: Orchestrator) -> None:
    result = orch.enqueue("deployment", params={"env": "staging"}).wait(60)
    assert result.status == "succeeded", result.errors
    deploy = result.steps["deploy_safla_instance"]
    health = result.steps["monitor_system_health"]
    assert deploy.output["environment"] == "staging" and deploy.output["instance_name"] == "safla-staging"
    assert health.output["deployment_id"] == deploy.output["deployment_id"]
    assert health.output["healthy"] is True  # the same server process saw the deployment: one pooled session
    assert_order(result, "deploy_safla_instance", "monitor_system_health")
    assert result.output == {"monitor_system_health": health.output}


def test_fan_out_to_three_services_then_aggregate(orch: Orchestrator) -> None:
    result = orch.enqueue(EXAMPLES / "workflows" / "fanout.yaml", params={"topic": "mcp"}).wait(60)
    assert result.status == "succeeded", result.errors
    assert result.output["report"] == {
        "topic": "mcp", "sources": 3, "docs": ["celery/mcp"], "score": result.steps["trend"].output["score"],
    }  # fmt: skip
    assert result.output["summary"] == "3 sources on mcp"
    for branch in ("research", "docs", "trend"):
        assert_order(result, branch, "report")


def test_third_party_server_from_pypi_in_a_group(orch: Orchestrator) -> None:
    result = orch.enqueue(EXAMPLES / "workflows" / "time.yaml", params={"zone": "Asia/Tokyo"}).wait(60)
    assert result.status == "succeeded", result.errors
    assert result.output["utc"]["timezone"] == "UTC"
    assert result.output["local"]["timezone"] == "Asia/Tokyo"
    assert result.output["local"]["datetime"].endswith("+09:00")


def test_diamond_dag_with_data_flow(test_orch: Orchestrator) -> None:
    workflow = dag(
        {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]},
        {
            "d": {
                "value": {"b": "${ steps.b.output.value }", "c": "${ steps.c.output.value }"},
                "label": "${ params.l }",
            }
        },
    )
    result = test_orch.enqueue(workflow, params={"l": "joined"}).wait(60)
    assert result.status == "succeeded", result.errors
    assert result.steps["d"].output["value"] == {"b": "b", "c": "c"}
    assert result.steps["d"].output["label"] == "joined"
    for before, after in [("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")]:
        assert_order(result, before, after)
    assert result.output == {"d": result.steps["d"].output}


def test_nested_chords_inside_a_chain(test_orch: Orchestrator) -> None:
    spec = {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"], "e": ["d"], "f": ["d"], "g": ["e", "f"]}
    result = test_orch.enqueue(dag(spec)).wait(60)
    assert result.status == "succeeded", result.errors
    assert set(ran(result).values()) == {"succeeded"}
    for step, deps in spec.items():
        for dep in deps:
            assert_order(result, dep, step)


def test_chords_inside_a_group_and_a_chain_ending_in_a_group(test_orch: Orchestrator) -> None:
    spec = {
        "x": [], "y1": ["x"], "y2": ["x"], "z": ["y1", "y2"],  # a chord inside one branch
        "p": [], "q1": ["p"], "q2": ["p"],  # a chain ending in a group, inside the outer group
    }  # fmt: skip
    result = test_orch.enqueue(dag(spec)).wait(60)
    assert result.status == "succeeded", result.errors
    assert ran(result) == dict.fromkeys(spec, "succeeded")
    assert set(result.output) == {"z", "q1", "q2"}


def test_single_step_group_and_empty_workflow(test_orch: Orchestrator) -> None:
    single = Workflow.model_validate(
        {"parallelSteps": [[{"service": "testing", "tool": "echo", "parameters": {"value": 1}}]]}
    )
    result = test_orch.enqueue(single).wait(60)
    assert result.status == "succeeded" and result.output == {"echo": result.steps["echo"].output}
    assert result.steps["echo"].output["value"] == 1  # a value, not a one-item list
    empty = test_orch.enqueue(Workflow.model_validate({"steps": []})).wait(60)
    assert empty.status == "succeeded" and empty.steps == {} and empty.output == {}


def test_non_series_parallel_dag_keeps_every_dependency(test_orch: Orchestrator) -> None:
    spec = {"a": [], "b": [], "c": ["a", "b"], "d": ["b"]}
    result = test_orch.enqueue(dag(spec)).wait(60)
    assert result.status == "succeeded", result.errors
    for step, deps in spec.items():
        for dep in deps:
            assert_order(result, dep, step)


def test_tool_error_fails_the_step_skips_dependents_and_keeps_other_branches(test_orch: Orchestrator) -> None:
    workflow = Workflow.model_validate({"id": "failing", "steps": [
        {"id": "bad", "service": "testing", "tool": "fail", "parameters": {"message": "no"}, "depends_on": []},
        {"id": "after", "service": "testing", "tool": "echo", "depends_on": ["bad"]},
        {"id": "later", "service": "testing", "tool": "echo", "depends_on": ["after"]},
        {"id": "other", "service": "testing", "tool": "echo", "parameters": {"value": 7}, "depends_on": []},
    ]})  # fmt: skip
    result = test_orch.enqueue(workflow).wait(60)
    assert result.status == "failed"
    assert ran(result) == {"bad": "failed", "after": "skipped", "later": "skipped", "other": "succeeded"}
    assert result.steps["bad"].attempts == 1  # a tool error is not retried
    assert result.steps["bad"].error_type == "ToolError" and "fail" in (result.steps["bad"].error or "")
    assert result.steps["after"].error == "upstream step 'bad' failed"
    assert [(e.step, e.service, e.tool, e.type) for e in result.errors] == [("bad", "testing", "fail", "ToolError")]
    assert result.output == {"other": result.steps["other"].output}


def test_crashed_server_is_retried_on_a_new_session(test_orch: Orchestrator) -> None:
    workflow = Workflow.model_validate({"id": "crash", "steps": [
        {"id": "boom", "service": "testing", "tool": "crash", "retries": 1},
    ]})  # fmt: skip
    result = test_orch.enqueue(workflow).wait(60)
    assert result.status == "failed"
    assert result.steps["boom"].attempts == 2 and result.steps["boom"].error_type == "TransportError"
    after = test_orch.enqueue(dag({"echo": []})).wait(60)
    assert after.status == "succeeded"  # the worker rebuilt its session to the restarted server


def test_status_from_another_process(test_orch: Orchestrator, worker_env: dict[str, str]) -> None:
    run = test_orch.enqueue(dag({"a": []}))
    run.wait(60)
    shown = subprocess.run([sys.executable, "-m", "orchestrator.cli", "status", run.id, "--json"], env=worker_env,
                           capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert data["id"] == run.id and data["status"] == "succeeded"
    assert set(data["steps"]["a"]) >= {"status", "service", "tool", "output", "error", "attempts", "duration_ms"}


def test_task_names_show_service_and_tool(test_orch: Orchestrator, workers: WorkerProcesses) -> None:
    test_orch.enqueue(dag({"named": []})).wait(60)
    logs = "".join(path.read_text(errors="replace") for path in workers.log_dir.glob("worker-testing-*.log"))
    assert "Task testing.echo[" in logs


def test_streamable_http_server(workers: WorkerProcesses, http_server: Callable[..., str], tmp_path: Path,
                                redis_url: str) -> None:  # fmt: skip
    url = http_server("knowledge.py", "research")
    config_path = tmp_path / "http.yaml"
    config_path.write_text(yaml.safe_dump({
        "servers": {"remote-research": {"url": url, "headers": {"X-Client": "tests"}}},
        "services": {"web": {"server": "remote-research", "tools": ["search"]}},
        "workflows": {"ask": {"steps": [
            {"id": "q", "service": "web", "tool": "search", "parameters": {"query": "${ params.q }", "limit": 2}}]}},
    }))  # fmt: skip
    workers.start("web", config=config_path)
    with Orchestrator(load_config(config_path), redis_url=redis_url) as orchestrator:
        results = [orchestrator.enqueue("ask", params={"q": f"http {i}"}) for i in range(5)]
        outputs = [run.wait(60) for run in results]
    assert all(r.status == "succeeded" for r in outputs), [r.errors for r in outputs]
    assert [r.steps["q"].output["summary"] for r in outputs] == [f"2 sources on http {i}" for i in range(5)]


def test_enqueue_without_a_worker_says_which_service_and_command(tmp_path: Path, redis_url: str,
                                                                  workers: WorkerProcesses) -> None:  # fmt: skip
    config_path = tmp_path / "lonely.yaml"
    config_path.write_text(yaml.safe_dump({
        "servers": {"s": {"command": "python", "args": ["x.py"]}},
        "workflows": {"w": {"steps": [{"service": "s", "tool": "t"}]}},
    }))  # fmt: skip
    with (
        Orchestrator(load_config(config_path), redis_url=redis_url) as orchestrator,
        pytest.raises(BrokerError) as caught,
    ):
        orchestrator.enqueue("w")
    assert "no worker serves queue(s)" in str(caught.value) and ".s" in str(caught.value)
    assert "mcp-orchestrator worker --service s" in str(caught.value)


def test_one_worker_process_carries_over_64_calls_in_flight(test_orch: Orchestrator) -> None:
    workflow = Workflow.model_validate({"id": "wide", "steps": [
        {"id": f"c{i}", "service": "testing", "tool": "concurrent", "parameters": {"seconds": 3.0}, "depends_on": []}
        for i in range(80)
    ]})  # fmt: skip
    result = test_orch.enqueue(workflow).wait(120)
    assert result.status == "succeeded", result.errors
    outputs = [step.output for step in result.steps.values()]
    assert max(output["max_in_flight"] for output in outputs) >= 64
    assert len({step.worker for step in result.steps.values()}) == 1
