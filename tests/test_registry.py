"""Discovery: tools and input schemas recorded per instance, and steps checked against them at enqueue."""

from __future__ import annotations

import json
import subprocess
import sys

import fakeredis
import pytest

from orchestrator import ConfigError, Orchestrator, Workflow
from orchestrator.registry import Registry
from orchestrator.workflow import plan

from .conftest import ROOT, TEST_SERVICES

SCHEMA = {"type": "object", "properties": {"seconds": {"type": "number"}, "tag": {"type": "string"}},
          "required": ["seconds"]}  # fmt: skip
SLEEP = {"name": "sleep", "description": "", "input_schema": SCHEMA}


def registry_with(*tools: dict) -> Registry:  # type: ignore[type-arg]
    registry = Registry(fakeredis.FakeRedis(), "t")
    registry.save("svc", "server", list(tools))
    return registry


def check(registry: Registry, parameters: dict, tool: str = "sleep") -> None:  # type: ignore[type-arg]
    workflow = Workflow.model_validate(
        {"steps": [{"id": "s", "service": "svc", "tool": tool, "parameters": parameters}]}
    )
    registry.check(plan(workflow, "w"), "flow.yaml")


def test_literal_arguments_are_checked_against_the_input_schema() -> None:
    registry = registry_with(SLEEP)
    check(registry, {"seconds": 1.5})
    with pytest.raises(ConfigError) as caught:
        check(registry, {"seconds": "soon"})
    assert str(caught.value) == (
        "flow.yaml: workflow 'w', step 's' (steps[0]), field 'parameters.seconds': 'soon' is not of type 'number' "
        "(tool 'sleep' of service 'svc')"
    )
    with pytest.raises(ConfigError, match="field 'parameters': 'seconds' is a required property"):
        check(registry, {"tag": "x"})


def test_arguments_from_templates_wait_for_run_time() -> None:
    check(registry_with(SLEEP), {"seconds": "${ params.delay }"})


def test_a_tool_that_disappeared_is_reported() -> None:
    with pytest.raises(ConfigError) as caught:
        check(registry_with(SLEEP), {}, tool="nap")
    assert "field 'tool': service 'svc' does not offer tool 'nap' (discovered " in str(caught.value)
    assert "sleep); it may have disappeared from the server" in str(caught.value)


def test_services_never_discovered_are_not_checked() -> None:
    Registry(fakeredis.FakeRedis(), "t").check(plan(Workflow.model_validate(
        {"steps": [{"service": "svc", "tool": "anything", "parameters": {"x": 1}}]}), "w"), None)  # fmt: skip


def test_discover_through_the_workers_then_enqueue_checks(test_orch: Orchestrator, worker_env: dict[str, str]) -> None:
    found = test_orch.fleet.discover(["testing"])
    assert {"echo", "sleep", "hang", "register"} <= set(found["testing"])
    bad = Workflow.model_validate({"id": "bad", "steps": [
        {"id": "nap", "service": "testing", "tool": "sleep", "parameters": {"seconds": "long"}}]})  # fmt: skip
    with pytest.raises(ConfigError, match=r"step 'nap' \(steps\[0\]\), field 'parameters.seconds': 'long' is not"):
        test_orch.enqueue(bad)
    gone = Workflow.model_validate({"steps": [{"service": "testing", "tool": "vanished"}]})
    with pytest.raises(ConfigError, match="does not offer tool 'vanished'"):
        test_orch.enqueue(gone)
    ok = Workflow.model_validate({"steps": [{"service": "testing", "tool": "sleep", "parameters": {"seconds": 0.01}}]})
    assert test_orch.enqueue(ok).wait(60).status == "succeeded"
    command = [sys.executable, "-m", "orchestrator.cli", "discover", "--config", str(TEST_SERVICES), "--json"]
    shown = subprocess.run(command, env=worker_env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "echo" in json.loads(shown.stdout)["testing"]
