"""Limits on untrusted input: workflow file bytes, step count, parameter bytes, expression length, YAML safe
loading and JSON-only messages; each refusal names file, workflow, step, field and the limit."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from kombu.exceptions import ContentDisallowed
from kombu.serialization import dumps, loads, prepare_accept_content

import celeryconfig
from orchestrator import ConfigError, LimitExceeded, load_config
from orchestrator.config import load_workflow, parse_config
from orchestrator.limits import Limits
from workers.app import app

from .conftest import ROOT

BASE: dict[str, Any] = {
    "servers": {"s": {"command": "python", "args": ["x.py"]}},
    "services": {"svc": {"server": "s"}},
}


def step(step_id: str, **fields: Any) -> dict[str, Any]:
    return {"id": step_id, "service": "svc", "tool": "echo", **fields}


def write(tmp_path: Path, data: Any, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def refusal(tmp_path: Path, workflow: dict[str, Any], limits: dict[str, int] | None = None) -> str:
    path = write(tmp_path, {**BASE, "limits": limits or {}, "workflows": {"wf": workflow}})
    with pytest.raises(LimitExceeded) as caught:
        load_config(path)
    assert isinstance(caught.value, ConfigError) and caught.value.source == str(path)
    return str(caught.value)


def test_defaults_are_sane_and_a_workflow_within_them_loads(tmp_path: Path) -> None:
    limits = Limits()
    assert (limits.workflow_bytes, limits.steps, limits.parameter_bytes, limits.expression_chars) == (
        1024 * 1024, 1000, 256 * 1024, 1000)  # fmt: skip
    steps = [step(f"s{i}", parameters={"v": "x" * 1000, "e": "${ params.a }"}) for i in range(200)]
    config = load_config(write(tmp_path, {**BASE, "workflows": {"wf": {"steps": steps}}}))
    assert len(config.graph(config.workflows["wf"], "wf").steps) == 200


def test_too_many_steps_names_the_workflow_and_the_limit(tmp_path: Path) -> None:
    workflow = {"steps": [step("a"), step("b")], "parallelSteps": [[step("c"), step("d")]]}
    message = refusal(tmp_path, workflow, {"steps": 3})
    assert message.endswith("config.yaml: workflow 'wf': 4 steps, over the limit of 3 (limits.steps)")


def test_oversized_parameters_name_the_step_and_field(tmp_path: Path) -> None:
    workflow = {"steps": [step("small", parameters={"v": "x"}), step("big", parameters={"v": "x" * 2000})]}
    message = refusal(tmp_path, workflow, {"parameter_bytes": 1024})
    assert "workflow 'wf', step 'big' (steps[1]), field 'parameters': over the limit of 1024 bytes" in message
    assert "(limits.parameter_bytes)" in message
    fallback = {"steps": [step("a", fallback={"service": "svc", "parameters": {"v": ["y" * 600] * 2}})]}
    assert "step 'a' (steps[0]), field 'fallback.parameters'" in refusal(tmp_path, fallback, {"parameter_bytes": 1024})
    output = {"steps": [step("a")], "output": {"report": "z" * 2000}}
    assert "workflow 'wf', field 'output': over the limit" in refusal(tmp_path, output, {"parameter_bytes": 1024})


def bomb(levels: int) -> str:
    """A workflow whose step parameters hold `levels` levels of ten aliases each: 10**levels strings once
    expanded, in a few hundred bytes."""
    anchors = ['a0: &a0 "lol"'] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels + 1)]
    workflow = yaml.safe_dump({**BASE, "workflows": {"wf": {"steps": [step("b")]}}})
    return workflow.replace("tool: echo", "tool: echo\n      parameters: {" + ", ".join(anchors) + "}")


def test_a_yaml_alias_bomb_is_refused_before_it_is_built(tmp_path: Path) -> None:
    path = write(tmp_path, bomb(9))
    assert path.stat().st_size < 1024
    with pytest.raises(LimitExceeded, match=r"its YAML aliases expand to 1234567\d+ nodes, over the limit of 1000000"):
        load_config(path)


def test_expanded_aliases_count_against_the_parameter_bytes(tmp_path: Path) -> None:
    path = write(tmp_path, bomb(5))  # 100,000 strings: under the node limit, over 256 KiB of parameters
    with pytest.raises(LimitExceeded, match=r"step 'b' \(steps\[0\]\), field 'parameters': over the limit of 262144"):
        load_config(path)


def test_deeply_nested_yaml_is_refused(tmp_path: Path) -> None:
    shallow = {**BASE, "workflows": {"wf": {"steps": [step("a", parameters={"v": [[[["deep enough"]]]]})]}}}
    assert load_config(write(tmp_path, shallow)).workflows["wf"].steps[0].parameters["v"] == [[[["deep enough"]]]]
    for depth in (150, 5000):  # past the limit; past Python's recursion limit
        path = write(tmp_path, f"workflows: {{wf: {{steps: [{{id: a, service: svc, tool: t, parameters: "
                               f"{{v: {'[' * depth}1{']' * depth}}}}}]}}}}\n", f"deep-{depth}.yaml")  # fmt: skip
        with pytest.raises(LimitExceeded, match=r"deep-\d+.yaml: YAML nested over 100 levels deep"):
            load_config(path)


def test_long_expressions_name_the_field(tmp_path: Path) -> None:
    long = "params." + "a" * 120
    workflow = {"steps": [step("a", parameters={"nested": {"q": f"find ${{ {long} }} now"}})]}
    message = refusal(tmp_path, workflow, {"expression_chars": 100})
    assert "workflow 'wf', step 'a' (steps[0]), field 'parameters.nested.q': an expression of 127 characters" in message
    assert "over the limit of 100 (limits.expression_chars)" in message
    condition = {"steps": [step("a", when=f"{long} == 'x'")]}
    assert "step 'a' (steps[0]), field 'when': an expression of" in refusal(
        tmp_path, condition, {"expression_chars": 100}
    )
    output = {"steps": [step("a")], "output": f"${{ {long} }}"}
    assert "workflow 'wf', field 'output': an expression of" in refusal(tmp_path, output, {"expression_chars": 100})


def test_a_workflow_file_over_the_byte_limit_is_refused_unread(tmp_path: Path) -> None:
    config = parse_config({**BASE, "limits": {"workflow_bytes": 2048}}, "config.yaml")
    small = write(tmp_path, {"steps": [step("a", parameters={"v": "x" * 100})]}, "small.yaml")
    assert load_workflow(small, config)[0] == "small"
    big = write(tmp_path, {"steps": [step("a", parameters={"v": "x" * 3000})]}, "big.yaml")
    with pytest.raises(LimitExceeded) as caught:
        load_workflow(big, config)
    assert str(caught.value) == f"{big}: the file is {big.stat().st_size} bytes, over the limit of 2048 " \
                                "(limits.workflow_bytes)"  # fmt: skip


def test_a_configuration_file_over_its_limit_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, {**BASE, "workflows": {"wf": {"steps": [step("a", parameters={"v": "x" * 5000})]}}})
    monkeypatch.setattr(celeryconfig.settings, "max_config_bytes", 4096)
    with pytest.raises(LimitExceeded, match=r"over the limit of 4096 \(MCPO_MAX_CONFIG_BYTES\)"):
        load_config(path)


def test_bad_limits_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"field 'limits.steps': Input should be greater than 0"):
        parse_config({**BASE, "limits": {"steps": 0}}, "config.yaml")
    with pytest.raises(ConfigError, match=r"field 'limits.step_count': Extra inputs are not permitted"):
        parse_config({**BASE, "limits": {"step_count": 5}}, "config.yaml")


def test_the_cli_exits_2_naming_the_limit(tmp_path: Path) -> None:
    path = write(tmp_path, {**BASE, "limits": {"steps": 1}, "workflows": {"wf": {"steps": [step("a"), step("b")]}}})
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "validate", str(path)], cwd=ROOT, env=os.environ,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2 and "workflow 'wf': 2 steps, over the limit of 1 (limits.steps)" in done.stderr


def test_yaml_tags_that_build_python_objects_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = write(tmp_path, f"servers: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="malformed YAML: could not determine a constructor for the tag"):
        load_config(path)
    assert not marker.exists()


def test_no_module_loads_yaml_unsafely() -> None:
    unsafe = ("yaml.load(", "yaml.unsafe_load", "yaml.full_load", "yaml.Loader", "UnsafeLoader", "FullLoader")
    sources = [p for d in ("orchestrator", "workers", "tasks") for p in (ROOT / d).rglob("*.py")]
    found = [f"{p.relative_to(ROOT)}: {u}" for p in sources for u in unsafe if u in p.read_text()]
    assert sources and not found


def test_workers_accept_json_messages_only() -> None:
    assert app.conf.accept_content == ["json"] and app.conf.result_accept_content == ["json"]
    accept = prepare_accept_content(app.conf.accept_content)  # as the worker's consumer builds it
    content_type, encoding, body = dumps({"run_id": "x"}, serializer="pickle")
    with pytest.raises(ContentDisallowed):
        loads(body, content_type, encoding, accept=accept)
    assert pickle.loads(body) == {"run_id": "x"}  # the message itself was fine: only its serializer is refused
    content_type, encoding, body = dumps({"run_id": "x"}, serializer="json")
    assert loads(body, content_type, encoding, accept=accept) == {"run_id": "x"}
