"""Limits on untrusted input: how big a workflow file, how many steps, how many bytes of parameters per step,
how long a `${ }` expression may be.

Workflows come from files and API callers the fleet does not control, and each of these grows the work of
every process that plans, stores and runs them. The checks run before a workflow is planned, so nothing
walks an oversized input first; parameter sizes are counted with a budget, so a YAML alias bomb (a few
lines that expand into millions of nodes) is refused without being expanded. YAML is loaded with the safe
loader only, and a document whose aliases would expand past YAML_NODES nodes is refused before it is built:
pydantic would otherwise walk (and describe, in its errors) the whole expansion.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from orchestrator.errors import ConfigError, ExpressionError, LimitExceeded
from orchestrator.expressions import condition, expressions
from orchestrator.workflow import Step, Workflow

KIB = 1024
YAML_NODES = 1_000_000  # nodes of a YAML document with its aliases expanded; a 1 MiB file without any has fewer
# Step ids, workflow, service, server (instance) and tool names: the records keep them in varchar(200) columns
# (orchestrator/history/tables.py), which PostgreSQL enforces and SQLite does not. Refused at load, the same on both.
IDENTIFIER_CHARS = 200
YAML_DEPTH = 100  # nesting of a YAML document; deeper ones would exhaust the recursion of whatever walks them


class Limits(BaseModel):
    """The `limits:` section of a configuration; every workflow of it, and every workflow file or Workflow
    enqueued with it, is held to these."""

    model_config = ConfigDict(extra="forbid")
    workflow_bytes: int = Field(default=1024 * KIB, gt=0)  # a workflow file, read through the configuration
    steps: int = Field(default=1000, gt=0)  # steps of one workflow, parallelSteps included
    parameter_bytes: int = Field(default=256 * KIB, gt=0)  # a step's parameters, as compact JSON
    expression_chars: int = Field(default=1000, gt=0)  # one `${ }` expression or `when:` condition


def check_identifier(value: str, where: str, source: str | None = None) -> None:
    """Refuse a name longer than the records store, naming where it is."""
    if len(value) > IDENTIFIER_CHARS:
        raise LimitExceeded(
            f"{where}: '{value[:40]}…' is {len(value)} characters long, over the limit of {IDENTIFIER_CHARS}",
            source=source,
        )


def check_file(path: Path, max_bytes: int, field: str) -> None:
    """Refuse a file over max_bytes before reading it."""
    try:
        size = path.stat().st_size
    except OSError:
        return  # reading it reports why
    if size > max_bytes:
        raise LimitExceeded(f"the file is {size} bytes, over the limit of {max_bytes} ({field})", source=str(path))


def load_yaml(text: str, source: str) -> Any:
    """yaml.safe_load, refusing a document whose aliases expand past YAML_NODES nodes (an alias bomb)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        expanded = _expanded_nodes(node, {}, YAML_DEPTH, source)
        if expanded > YAML_NODES:
            raise LimitExceeded(
                f"its YAML aliases expand to {expanded} nodes, over the limit of {YAML_NODES}", source=source
            )
        return loader.construct_document(node)
    except RecursionError as exc:  # PyYAML's composer recurses per level of nesting
        raise LimitExceeded(f"YAML nested over {YAML_DEPTH} levels deep", source=source) from exc
    finally:
        loader.dispose()


def _expanded_nodes(node: yaml.Node, seen: dict[int, int], depth: int, source: str) -> int:
    # An alias is the same node object as its anchor: counted once per appearance, computed once.
    if id(node) in seen:
        return seen[id(node)]
    if depth < 0:
        line = node.start_mark.line + 1
        raise LimitExceeded(f"YAML nested over {YAML_DEPTH} levels deep (line {line})", source=source)
    count = 1
    if isinstance(node, yaml.SequenceNode):
        count += sum(_expanded_nodes(item, seen, depth - 1, source) for item in node.value)
    elif isinstance(node, yaml.MappingNode):
        _check_unique_keys(node, source)
        count += sum(_expanded_nodes(key, seen, depth - 1, source) + _expanded_nodes(value, seen, depth - 1, source)
                     for key, value in node.value)  # fmt: skip
    seen[id(node)] = count
    return count


def _check_unique_keys(node: yaml.MappingNode, source: str) -> None:
    # PyYAML keeps the last of two equal keys silently; a second `timeout:` or `steps:` is a mistake to show.
    seen: set[tuple[str, str]] = set()
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
            continue
        if (key.tag, key.value) in seen:
            raise ConfigError(f"line {key.start_mark.line + 1}: duplicate key '{key.value[:100]}'", source=source)
        seen.add((key.tag, key.value))


def check_workflow(workflow: Workflow, name: str, limits: Limits, source: str | None) -> None:
    """Refuse a workflow with too many steps, too large parameters or too long expressions, naming the step
    and field."""
    check_identifier(name, "the workflow's name", source)
    where = f"workflow '{name}'"
    _check_names(workflow, where, source)
    count = len(workflow.steps) + sum(len(group) for group in workflow.parallel_steps)
    if count > limits.steps:
        raise LimitExceeded(f"{where}: {count} steps, over the limit of {limits.steps} (limits.steps)", source=source)
    for place, step in _steps(workflow):
        label = f"{where}, step '{step.id or step.tool}' ({place})"
        for field, value in _step_fields(step):
            _check_size(value, limits.parameter_bytes, f"{label}, field '{field}'", source)
            _check_expressions(value, field, limits.expression_chars, label, source)
    _check_size(workflow.output, limits.parameter_bytes, f"{where}, field 'output'", source)
    _check_expressions(workflow.output, "output", limits.expression_chars, where, source)


def _check_names(workflow: Workflow, where: str, source: str | None) -> None:
    for place, step in _steps(workflow):
        names = {"id": step.id or "", "service": step.service, "tool": step.tool, "depends_on": ""}
        names.update({f"depends_on[{index}]": dep for index, dep in enumerate(step.depends_on or [])})
        if step.fallback is not None:
            names.update({"fallback.service": step.fallback.service, "fallback.tool": step.fallback.tool or ""})
        for field, value in names.items():
            check_identifier(value, f"{where}, {place}, field '{field}'", source)


def _steps(workflow: Workflow) -> Iterator[tuple[str, Step]]:
    for index, step in enumerate(workflow.steps):
        yield f"steps[{index}]", step
    for group_index, group in enumerate(workflow.parallel_steps):
        for index, step in enumerate(group):
            yield f"parallelSteps[{group_index}][{index}]", step


def _step_fields(step: Step) -> Iterator[tuple[str, Any]]:
    yield "parameters", step.parameters
    if step.fallback is not None and step.fallback.parameters is not None:
        yield "fallback.parameters", step.fallback.parameters
    if step.when is not None:
        yield "when", condition(step.when)


def _check_size(value: Any, limit: int, where: str, source: str | None) -> None:
    if _bounded_size(value, limit) > limit:
        raise LimitExceeded(f"{where}: over the limit of {limit} bytes of JSON (limits.parameter_bytes)", source=source)


def _check_expressions(value: Any, field: str, limit: int, where: str, source: str | None) -> None:
    try:
        found = list(expressions(value, field))
    except ExpressionError as exc:  # an unclosed `${`: the message gains the workflow, step and file
        raise ExpressionError(f"{where}, {exc}", source=source) from exc
    for expression, path in found:
        if len(expression) > limit:
            raise LimitExceeded(
                f"{where}, field '{path}': an expression of {len(expression)} characters, over the limit of "
                f"{limit} (limits.expression_chars)",
                source=source,
            )


def _bounded_size(value: Any, budget: int) -> int:
    """About the bytes of value as compact JSON, counted only until budget is passed: shared nodes (YAML
    aliases) count each time they appear, as they would once serialized, yet are never expanded."""
    size = 0
    stack = [value]
    while stack and size <= budget:
        item = stack.pop()
        if isinstance(item, str):
            size += len(item.encode()) + 2
        elif isinstance(item, Mapping):
            size += 2 + len(item)
            for key, nested in item.items():
                size += len(str(key).encode()) + 3
                stack.append(nested)
        elif isinstance(item, list | tuple):
            size += 2 + len(item)
            stack.extend(item)
        else:
            size += len(str(item))
    return size
