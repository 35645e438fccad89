"""Property-based tests: whatever the configuration loader, the workflow loader and the expression language are
given, they answer with a valid result or an error of our hierarchy (OrchestratorError), never another exception.

Kept short (a modest max_examples, no deadline: the machine is shared); a failure prints the smallest input.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.config import Config, load_config, load_workflow, parse_config
from orchestrator.errors import OrchestratorError
from orchestrator.expressions import condition, references, render
from orchestrator.params import parse_json, parse_pair
from orchestrator.workflow import Graph

from .conftest import TEST_SERVICES

SHORT = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Keys the loaders know, mixed with any text: most generated documents get past the first check or two.
KEYS = st.sampled_from([
    "servers", "mcpServers", "services", "workflows", "access", "limits", "command", "args", "url", "type", "env",
    "headers", "auth", "verify", "server", "instances", "tools", "timeout", "retries", "breaker", "health", "steps",
    "parallelSteps", "id", "service", "tool", "parameters", "depends_on", "when", "fallback", "optional",
    "sensitive", "params", "output", "testing", "echo", "a", "b",
]) | st.text(max_size=8)  # fmt: skip
SCALARS = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    | st.sampled_from(["testing", "echo", "python", "http://127.0.0.1:9/mcp", "${ params.n }", "${", "}", ".inf"])
)  # fmt: skip
DOCUMENTS = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=5), max_leaves=25
)
TOKENS = ["${", "}", "{", " ", "params", ".", "n", "steps", "a", "output", "'", '"', "`", "\\", "[", "]", "|", "&&",
          "==", "!", "*", "@", "(", ")", "0", "-", "x"]  # fmt: skip
TEMPLATE_TEXT = st.lists(st.sampled_from(TOKENS), max_size=25).map("".join)
CONFIG = load_config(TEST_SERVICES)


def yaml_text(document: Any) -> str:
    return yaml.safe_dump(document, allow_unicode=True)


@SHORT
@given(DOCUMENTS)
def test_the_configuration_loader_gives_a_config_or_a_clean_error(document: Any) -> None:
    try:
        config = parse_config(document, "generated.yaml")
        config.check()
    except OrchestratorError:
        return
    assert isinstance(config, Config)


@SHORT
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode) | DOCUMENTS.map(yaml_text).map(str.encode))
def test_a_configuration_file_of_any_bytes_gives_a_config_or_a_clean_error(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as directory:
        for name in ("config.yaml", "config.json"):
            path = Path(directory) / name
            path.write_bytes(content)
            try:
                load_config(path)
            except OrchestratorError:
                continue


@SHORT
@given(DOCUMENTS)
def test_the_workflow_loader_gives_a_workflow_or_a_clean_error(document: Any) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "generated.yaml"
        path.write_text(yaml_text(document))
        try:
            name, workflow = load_workflow(path, CONFIG)
        except OrchestratorError:
            return
        assert isinstance(CONFIG.graph(workflow, name, str(path)), Graph)


@SHORT
@given(st.lists(st.fixed_dictionaries({
    "id": st.sampled_from(["a", "b", "c", "a" * 201]), "service": st.sampled_from(["testing", "nope"]),
    "tool": st.sampled_from(["echo", "sleep"]), "depends_on": st.lists(st.sampled_from(["a", "b", "c"]), max_size=2),
    "parameters": st.dictionaries(st.sampled_from(["x", "y"]), TEMPLATE_TEXT, max_size=2),
    "when": TEMPLATE_TEXT, "timeout": st.sampled_from([1, 0, -1, 999999, float("inf"), float("nan")]),
}), max_size=4))  # fmt: skip
def test_a_dag_of_steps_gives_a_graph_or_a_clean_error(steps: list[dict[str, Any]]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "dag.json"
        path.write_text(json.dumps({"steps": steps}))
        try:
            load_workflow(path, CONFIG)
        except OrchestratorError:
            return


@SHORT
@given(TEMPLATE_TEXT, st.dictionaries(st.sampled_from(["n", "m"]), SCALARS, max_size=2))
def test_expressions_give_a_value_or_a_clean_error(text: str, params: dict[str, Any]) -> None:
    context = {"params": params, "steps": {"a": {"output": params, "status": "succeeded"}}}
    for value in (text, {"field": [text]}, condition(text) if text.strip() else text):
        try:
            references(value, "parameters")
            render(value, context)
        except OrchestratorError:
            continue


@SHORT
@given(st.text(max_size=40), st.text(max_size=40))
def test_command_line_parameters_give_a_value_or_a_clean_error(pair: str, params: str) -> None:
    for parse, text in ((parse_pair, pair), (parse_pair, f"n={pair}"), (parse_json, params)):
        try:
            parse(text)
        except OrchestratorError:
            continue
