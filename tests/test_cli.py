"""The command line as a new user meets it: the embedded default (no REDIS_URL), exit codes, --json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT, SERVICES, TEST_SERVICES


@pytest.fixture
def embedded_env(tmp_path: Path) -> dict[str, str]:
    """A new user's environment: no REDIS_URL, a home of its own."""
    env = {key: value for key, value in os.environ.items() if key not in ("REDIS_URL", "MCPO_REDIS_URL")}
    env["MCPO_HOME"] = str(tmp_path / "home")
    return env


def cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_run_on_the_embedded_default_shows_progress_then_the_result(embedded_env: dict[str, str]) -> None:
    done = cli(embedded_env, "run", "deployment", "--config", str(SERVICES), "--param", "env=qa")
    assert done.returncode == 0, done.stderr
    assert "step deploy_safla_instance (primary.deploy_safla_instance) started" in done.stderr
    assert "step monitor_system_health (primary.monitor_system_health) succeeded in" in done.stderr
    assert done.stdout.startswith("run ") and " succeeded in " in done.stdout.splitlines()[0]
    output = json.loads(done.stdout.split("\n", 1)[1])
    assert output["monitor_system_health"]["healthy"] is True


def test_json_result_and_status_from_a_later_process(embedded_env: dict[str, str]) -> None:
    done = cli(embedded_env, "run", "examples/workflows/fanout.yaml", "--config", str(SERVICES), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert set(result) >= {"id", "status", "steps", "output", "errors"}
    assert result["status"] == "succeeded" and result["errors"] == []
    assert set(result["steps"]) == {"research", "docs", "trend", "report"}
    step = result["steps"]["report"]
    assert {k: step[k] for k in ("status", "service", "tool", "attempts")} == {
        "status": "succeeded", "service": "analytics", "tool": "combine", "attempts": 1,
    }  # fmt: skip
    assert step["duration_ms"] > 0
    # The embedded Redis saved its data when `run` exited: a new process reads the run back by id.
    shown = cli(embedded_env, "status", result["id"], "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["output"] == result["output"]


def test_failed_workflow_exits_1_and_lists_its_errors(embedded_env: dict[str, str], tmp_path: Path) -> None:
    flow = tmp_path / "failing.yaml"
    flow.write_text(yaml.safe_dump({"id": "failing", "steps": [
        {"service": "testing", "tool": "fail", "parameters": {"message": "bad input"}},
        {"service": "testing", "tool": "echo"}]}))  # fmt: skip
    done = cli(embedded_env, "run", str(flow), "--config", str(TEST_SERVICES))
    assert done.returncode == 1, done.stderr
    assert "run " in done.stdout and " failed" in done.stdout
    assert "✘ fail (testing.fail) ToolError" in done.stdout
    assert "step echo (testing.echo) skipped: upstream step 'fail' failed" in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "nope", "--config", str(SERVICES)], "no workflow named 'nope' (workflows: basic_deployment, deploym"),
        (["run", "deployment"], "no configuration: pass --config FILE or set MCPO_CONFIG"),
        (["run", "deployment", "--config", str(SERVICES), "--param", "novalue"], "expected KEY=VALUE"),
        (["status", "0123456789abcdef"], "run 0123456789abcdef is not known"),
        (["worker", "--service", "ghost", "--config", str(SERVICES)], "unknown service(s) ghost"),
    ],
)
def test_invalid_input_exits_2_with_a_clear_error(embedded_env: dict[str, str], args: list[str], message: str) -> None:
    done = cli(embedded_env, *args)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert message in done.stderr


def test_validate_shows_each_workflow_canvas(embedded_env: dict[str, str]) -> None:
    done = cli(embedded_env, "validate", str(SERVICES))
    assert done.returncode == 0, done.stderr
    assert "ok: workflow 'deployment': 2 steps, canvas deploy_safla_instance → monitor_system_health" in done.stdout
    fanout = cli(embedded_env, "validate", "examples/workflows/fanout.yaml", "--config", str(SERVICES))
    assert "canvas [research | docs | trend] → report" in fanout.stdout


def test_malformed_yaml_exits_2_with_its_position(embedded_env: dict[str, str], tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("steps:\n  - service: primary\n    tool: [unclosed\n")
    done = cli(embedded_env, "validate", str(broken), "--config", str(SERVICES))
    assert done.returncode == 2
    assert f"{broken}: line 4, column 1: malformed YAML" in done.stderr


def test_validate_names_file_workflow_step_and_field(embedded_env: dict[str, str], tmp_path: Path) -> None:
    flow = tmp_path / "typo.yaml"
    flow.write_text(yaml.safe_dump({"id": "typo", "steps": [{"id": "s1", "service": "primray", "tool": "noop"}]}))
    done = cli(embedded_env, "validate", str(flow), "--config", str(SERVICES))
    assert done.returncode == 2
    assert f"{flow}: workflow 'typo', step 's1' (steps[0]), field 'service': unknown service 'primray'" in done.stderr


def test_enqueue_needs_separate_workers(embedded_env: dict[str, str]) -> None:
    done = cli(embedded_env, "enqueue", "deployment", "--config", str(SERVICES))
    assert done.returncode == 2
    assert "set REDIS_URL, or use `run`" in done.stderr
