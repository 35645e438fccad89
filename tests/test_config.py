"""Configuration loading and every compile-time error, with the message a user sees."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator import ConfigError, load_config
from orchestrator.config import HttpServer, StdioServer, load_workflow, parse_config

from .conftest import SERVICES

BASE: dict[str, Any] = {
    "servers": {"s": {"command": "python", "args": ["x.py"]}},
    "services": {"svc": {"server": "s", "tools": ["a", "b"]}},
}


def write(tmp_path: Path, data: Any, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def config_error(tmp_path: Path, workflow: Any) -> str:
    path = write(tmp_path, {**BASE, "workflows": {"wf": workflow}})
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return str(caught.value)


def test_seed_example_loads_as_is() -> None:
    config = load_config(SERVICES)
    assert config.services["primary"].tools == ["deploy_safla_instance", "monitor_system_health"]
    assert config.services["fallback"].server == "safla-backup"
    graph = config.graph(config.workflows["deployment"], "deployment")
    assert [(s.id, s.depends_on) for s in graph.steps] == [
        ("deploy_safla_instance", ()),
        ("monitor_system_health", ("deploy_safla_instance",)),
    ]


def test_seed_json_shape_with_string_fallbacks(tmp_path: Path) -> None:
    seed = {
        "servers": {"safla": {"command": "python"}, "safla-backup": {"command": "python"}},
        "services": {
            "primary": {"server": "safla", "tools": ["deploy_safla_instance", "monitor_system_health"],
                        "timeout": 60, "retries": 3},
            "fallback": {"server": "safla-backup", "tools": ["basic_monitoring"], "timeout": 30, "retries": 1},
        },
        "workflows": {
            "deployment": {
                "steps": [{"service": "primary", "tool": "deploy_safla_instance"},
                          {"service": "primary", "tool": "monitor_system_health"}],
                "fallback": "basic_deployment",
            },
            "basic_deployment": {
                "id": "basic", "name": "Basic", "errorHandling": {"strategy": "retry"},
                "steps": [{"service": "fallback", "tool": "basic_monitoring", "parameters": {}, "timeout": 5,
                           "retries": 0}],
                "parallelSteps": [[{"service": "fallback", "tool": "basic_monitoring"}]],
            },
        },
    }  # fmt: skip
    import json

    config = load_config(write(tmp_path, json.dumps(seed), "seed.json"))
    basic = config.graph(config.workflows["basic_deployment"], "basic_deployment")
    assert [s.id for s in basic.steps] == ["basic_monitoring", "basic_monitoring-2"]
    assert basic.steps[1].depends_on == ("basic_monitoring",)


def test_mcp_json_servers_are_read_as_is(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, {
        "mcpServers": {
            "safla": {"command": "python", "args": ["safla/mcp_stdio_server.py"], "alwaysAllow": ["x"], "timeout": 60},
            "remote": {"type": "streamable-http", "url": "http://127.0.0.1:1/mcp", "headers": {"X-Team": "a"}},
        }
    }))  # fmt: skip
    assert isinstance(config.servers["safla"], StdioServer)
    assert isinstance(config.servers["remote"], HttpServer)
    # A server no service names is a service of its own, with any tool.
    assert config.services["remote"].server == "remote" and config.services["remote"].tools == []


def test_python_command_is_this_interpreter_and_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    import sys

    config = load_config(write(tmp_path, BASE))
    params = config.server_params("s")
    assert isinstance(params, StdioServer)
    assert params.command == sys.executable and params.cwd == str(tmp_path)


def test_malformed_yaml_names_file_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "services:\n  svc: {server: s\n")
    with pytest.raises(ConfigError, match=r"config\.yaml: line 3, column 1: malformed YAML"):
        load_config(path)


def test_unknown_field_names_its_path(tmp_path: Path) -> None:
    message = config_error(tmp_path, {"steps": [{"service": "svc", "tool": "a", "depend_on": []}]})
    assert "field 'workflows.wf.steps[0].depend_on': Extra inputs are not permitted" in message


def test_unknown_service(tmp_path: Path) -> None:
    message = config_error(tmp_path, {"steps": [{"id": "one", "service": "nope", "tool": "a"}]})
    assert message == (
        f"{tmp_path / 'config.yaml'}: workflow 'wf', step 'one' (steps[0]), field 'service': "
        "unknown service 'nope' (services: svc)"
    )


def test_tool_not_in_service_tools(tmp_path: Path) -> None:
    message = config_error(tmp_path, {"steps": [{"service": "svc", "tool": "zap"}]})
    assert message.endswith(
        "workflow 'wf', step 'zap' (steps[0]), field 'tool': tool 'zap' is not in service 'svc' tools (a, b)"
    )


def test_reference_to_unknown_step(tmp_path: Path) -> None:
    message = config_error(tmp_path, {"steps": [
        {"id": "one", "service": "svc", "tool": "a", "parameters": {"x": "${ steps.ghost.output }"}}]})  # fmt: skip
    assert message.endswith(
        "workflow 'wf', step 'one' (steps[0]), field 'parameters.x': reference to unknown step 'ghost'"
    )


def test_reference_to_later_step(tmp_path: Path) -> None:
    message = config_error(tmp_path, {"steps": [
        {"id": "one", "service": "svc", "tool": "a", "parameters": {"x": "${ steps.two.output.v }"}},
        {"id": "two", "service": "svc", "tool": "b"}]})  # fmt: skip
    assert "step 'one' (steps[0]), field 'parameters.x': reads step 'two', which does not run before it" in message


def test_reference_to_parallel_step_in_a_dag(tmp_path: Path) -> None:
    message = config_error(tmp_path, {"steps": [
        {"id": "one", "service": "svc", "tool": "a", "depends_on": []},
        {"id": "two", "service": "svc", "tool": "b", "depends_on": [],
         "parameters": {"x": "${ steps.one.output }"}}]})  # fmt: skip
    assert "step 'two', field 'parameters.x': reads step 'one', which does not run before it" in message
    assert "add 'one' to depends_on" in message


def test_dependency_cycle_is_named(tmp_path: Path) -> None:
    message = config_error(tmp_path, {"steps": [
        {"id": "a", "service": "svc", "tool": "a", "depends_on": ["c"]},
        {"id": "b", "service": "svc", "tool": "a", "depends_on": ["a"]},
        {"id": "c", "service": "svc", "tool": "a", "depends_on": ["b"]}]})  # fmt: skip
    assert message.endswith("workflow 'wf': dependency cycle a -> b -> c -> a (field 'depends_on')")


def test_duplicate_step_ids(tmp_path: Path) -> None:
    message = config_error(tmp_path, {"steps": [
        {"id": "x", "service": "svc", "tool": "a"}, {"id": "x", "service": "svc", "tool": "b"}]})  # fmt: skip
    assert message.endswith("workflow 'wf', step 'x' (steps[1]), field 'id': duplicate step id 'x'")


def test_unknown_dependency(tmp_path: Path) -> None:
    message = config_error(tmp_path, {"steps": [{"id": "x", "service": "svc", "tool": "a", "depends_on": ["y"]}]})
    assert message.endswith("step 'x', field 'depends_on': unknown step 'y' (steps: x)")


def test_dag_step_without_depends_on_is_rejected_with_how_to_write_it(tmp_path: Path) -> None:
    message = config_error(tmp_path, {"steps": [
        {"id": "a", "service": "svc", "tool": "a", "depends_on": []},
        {"id": "b", "service": "svc", "tool": "a"}]})  # fmt: skip
    assert "step 'b', field 'depends_on': missing" in message
    assert "write 'depends_on: []' for a step that starts at once" in message


def test_parallel_steps_mixed_with_depends_on_is_rejected(tmp_path: Path) -> None:
    message = config_error(tmp_path, {
        "steps": [{"id": "a", "service": "svc", "tool": "a", "depends_on": []}],
        "parallelSteps": [[{"service": "svc", "tool": "b"}]]})  # fmt: skip
    assert "'parallelSteps' cannot be combined with 'depends_on' (it could mean two things)" in message


def test_invalid_expression(tmp_path: Path) -> None:
    message = config_error(tmp_path, {"steps": [{"service": "svc", "tool": "a", "parameters": {"x": "${ steps.[ }"}}]})
    assert "field 'parameters.x': invalid expression 'steps.['" in message


def test_unknown_server_in_service(tmp_path: Path) -> None:
    path = write(tmp_path, {"servers": {}, "services": {"svc": {"server": "gone"}}})
    with pytest.raises(ConfigError, match=r"services\.svc\.server: unknown server 'gone'"):
        load_config(path)


def test_workflow_file_with_bad_step_names_the_file(tmp_path: Path) -> None:
    config = parse_config(BASE)
    path = write(tmp_path, {"id": "mine", "steps": [{"service": "svc", "tool": "nope"}]}, "flow.yaml")
    with pytest.raises(ConfigError) as caught:
        load_workflow(path, config)
    assert str(caught.value).startswith(f"{path}: workflow 'mine', step 'nope' (steps[0]), field 'tool'")


def test_service_with_several_instances() -> None:
    servers = {"a": {"url": "http://127.0.0.1:1/mcp"}, "b": {"command": "python", "args": ["b.py"]}}
    config = parse_config({"servers": servers, "services": {"svc": {"instances": ["a", "b"]}}})
    assert config.services["svc"].servers == ["a", "b"] and set(config.services) == {"svc"}


@pytest.mark.parametrize(
    ("service", "message"),
    [
        ({"server": "a", "instances": ["a"]}, r"field 'services.svc': give 'server' \(one server\) or 'instances'"),
        ({"tools": ["x"]}, r"field 'services.svc': give 'server' \(one server\) or 'instances'"),
        ({"instances": ["a", "a"]}, "'instances' names a server twice"),
        ({"instances": ["a", "gone"]}, r"services\.svc\.instances: unknown server 'gone'"),
    ],
)
def test_bad_instances(tmp_path: Path, service: dict[str, Any], message: str) -> None:
    path = write(tmp_path, {"servers": {"a": {"url": "http://127.0.0.1:1/mcp"}}, "services": {"svc": service}})
    with pytest.raises(ConfigError, match=message):
        load_config(path)
