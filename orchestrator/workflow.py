"""Workflow definitions: the seed's sequence form and the DAG form, normalised to one step graph.

The rule that tells the two forms apart: a workflow is in **DAG form** when any of its steps has a
`depends_on` key; then every step must have one (`depends_on: []` for a step that starts at once) and
`parallelSteps` is not allowed. Otherwise it is in **sequence form**: `steps` run one after another,
then each list in `parallelSteps` runs as one parallel group, the groups in order.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from orchestrator.errors import ConfigError, ExpressionError
from orchestrator.expressions import condition, references
from orchestrator.messages import DEFAULT_RETRIES, DEFAULT_TIMEOUT, PlannedFallback, PlannedStep

# A service's timeout and retries, by its name: what a step that does not set its own gets.
Defaults = Callable[[str], tuple[float, int]]


class Fallback(BaseModel):
    """Where a step's call goes when its own service cannot serve it."""

    model_config = ConfigDict(extra="forbid")
    service: str
    tool: str | None = None
    parameters: dict[str, Any] | None = None


class StepCache(BaseModel):
    """A step's `cache: {ttl: SECONDS}`: its answers kept that long, whatever its service says."""

    model_config = ConfigDict(extra="forbid")
    ttl: float = Field(gt=0, allow_inf_nan=False)


class Step(BaseModel):
    """One MCP tool call in a workflow."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    id: str | None = None
    service: str
    tool: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    timeout: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    retries: int | None = Field(default=None, ge=0)
    fallback: Fallback | None = None
    depends_on: list[str] | None = Field(default=None, alias="depends_on")
    when: str | None = None
    optional: bool = False
    use_stale: float | None = Field(default=None, gt=0)
    retry_tool_errors: bool = False
    sensitive: bool = False  # arguments, output and errors sealed end to end (orchestrator/security/sealing.py)
    cache: bool | StepCache | None = None  # false: never from the response cache; true or {ttl}: even if not read-only

    @model_validator(mode="before")
    @classmethod
    def _fallback_shorthand(cls, data: Any) -> Any:
        # The seed writes `fallback: <service>`: the same call on another service.
        if isinstance(data, dict) and isinstance(data.get("fallback"), str):
            return {**data, "fallback": {"service": data["fallback"]}}
        return data


class Workflow(BaseModel):
    """A workflow as written: the seed's shape (`steps`, `parallelSteps`, `errorHandling`) or a DAG."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    id: str | None = None
    name: str | None = None
    description: str | None = None
    steps: list[Step] = Field(default_factory=list)
    parallel_steps: list[list[Step]] = Field(default_factory=list, alias="parallelSteps")
    error_handling: Any = Field(default=None, alias="errorHandling")
    fallback: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    output: Any = None
    sensitive: bool = False  # every step sensitive, and the run's params and output sealed

    def version(self) -> str:
        """A short hash of the definition: two runs of the same version ran the same workflow."""
        text = json.dumps(self.model_dump(mode="json", by_alias=True), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Graph:
    """A workflow normalised to a DAG of planned steps, in definition order."""

    name: str
    steps: tuple[PlannedStep, ...]
    output: Any = None
    index: dict[str, PlannedStep] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        self.index.update({step.id: step for step in self.steps})

    @functools.cached_property
    def sensitive(self) -> bool:
        """Whether the run's params and output are sealed: some step handles sensitive data (asked once per
        step by the compiler, so kept)."""
        return any(step.sensitive for step in self.steps)

    def ancestors(self, step_id: str) -> set[str]:
        seen: set[str] = set()
        stack = list(self.index[step_id].depends_on)
        while stack:
            current = stack.pop()
            if current not in seen:
                seen.add(current)
                stack.extend(self.index[current].depends_on)
        return seen

    def sinks(self) -> list[str]:
        used = {dep for step in self.steps for dep in step.depends_on}
        return [step.id for step in self.steps if step.id not in used]


def plan(workflow: Workflow, name: str, source: str | None = None, defaults: Defaults | None = None) -> Graph:
    """Normalise a workflow to its step graph, checking ids, dependencies, cycles and references. Each step's
    timeout and retries, and its fallback's, are resolved here, once: the step's own, else its service's
    (`defaults`; without it, the built-in defaults)."""
    where = f"workflow '{name}'"
    is_dag = any(step.depends_on is not None for step in workflow.steps)
    planner = _plan_dag if is_dag else _plan_sequence
    steps = planner(workflow, where, source, defaults or _builtin)
    graph = Graph(name=name, steps=tuple(steps), output=workflow.output)
    _check_cycles(graph, where, source)
    _check_references(graph, where, source)
    return _tainted(graph, workflow.sensitive)


def _tainted(graph: Graph, everything: bool) -> Graph:
    """The graph with every step sensitive that is marked so, or whose workflow is, or that reads a sensitive
    step's output: what a step computes from sealed data is kept sealed too."""
    sensitive = {step.id for step in graph.steps if step.sensitive or everything}
    changed = True
    while changed:
        changed = False
        for step in graph.steps:
            reads = references({"parameters": step.parameters, "when": step.when}, "")
            if step.id not in sensitive and sensitive & set(reads):
                sensitive.add(step.id)
                changed = True
    if not sensitive:
        return graph
    steps = tuple(replace(step, sensitive=step.id in sensitive) for step in graph.steps)
    return Graph(name=graph.name, steps=steps, output=graph.output)


def _plan_dag(workflow: Workflow, where: str, source: str | None, defaults: Defaults) -> list[PlannedStep]:
    if workflow.parallel_steps:
        raise ConfigError(
            f"{where}: 'parallelSteps' cannot be combined with 'depends_on' (it could mean two things). "
            "Write a DAG: put every step in 'steps' with an 'id', and give the steps that run together "
            "the same 'depends_on'.",
            source=source,
        )
    planned = []
    for index, step in enumerate(workflow.steps):
        place = f"{where}, steps[{index}]"
        if step.id is None:
            raise ConfigError(f"{place} (tool '{step.tool}'), field 'id': a DAG step needs an id", source=source)
        if step.depends_on is None:
            raise ConfigError(
                f"{where}, step '{step.id}', field 'depends_on': missing. Other steps of this workflow have "
                "'depends_on', so it is a DAG, where every step says what it waits for: write "
                "'depends_on: []' for a step that starts at once, or remove 'depends_on' from every step "
                "to run 'steps' in order.",
                source=source,
            )
        planned.append(_planned(step, step.id, tuple(step.depends_on), f"{where}, step '{step.id}'", defaults))
    _check_unique(planned, where, source)
    known = {planned_step.id for planned_step in planned}
    for planned_step in planned:
        for dep in planned_step.depends_on:
            if dep not in known:
                raise ConfigError(
                    f"{planned_step.where}, field 'depends_on': unknown step '{dep}' "
                    f"(steps: {', '.join(sorted(known))})",
                    source=source,
                )
    return planned


def _plan_sequence(workflow: Workflow, where: str, source: str | None, defaults: Defaults) -> list[PlannedStep]:
    stages: list[list[tuple[Step, str]]] = [[(step, f"steps[{i}]")] for i, step in enumerate(workflow.steps)]
    stages += [
        [(step, f"parallelSteps[{g}][{i}]") for i, step in enumerate(group)]
        for g, group in enumerate(workflow.parallel_steps)
    ]
    ids = _default_ids(step for stage in stages for step, _ in stage)
    planned: list[PlannedStep] = []
    previous: tuple[str, ...] = ()
    counter = 0
    for stage in stages:
        current = []
        for step, place in stage:
            step_id = ids[counter]
            counter += 1
            label = f"{where}, step '{step_id}' ({place})"
            current.append(_planned(step, step_id, previous, label, defaults))
        planned += current
        previous = tuple(step.id for step in current)
    _check_unique(planned, where, source)
    return planned


def _default_ids(steps: Iterable[Step]) -> list[str]:
    """Explicit ids stay; an unnamed step is named after its tool (`tool-2`, … when a tool repeats)."""
    steps = list(steps)
    explicit = {step.id for step in steps if step.id}
    ids, used = [], set(explicit)
    for step in steps:
        if step.id:
            ids.append(step.id)
            continue
        candidate, n = step.tool, 1
        while candidate in used:
            n += 1
            candidate = f"{step.tool}-{n}"
        used.add(candidate)
        ids.append(candidate)
    return ids


def _builtin(service: str) -> tuple[float, int]:
    return DEFAULT_TIMEOUT, DEFAULT_RETRIES


def _planned(step: Step, step_id: str, depends_on: tuple[str, ...], where: str, defaults: Defaults) -> PlannedStep:
    timeout, retries = defaults(step.service)
    return PlannedStep(
        id=step_id,
        service=step.service,
        tool=step.tool,
        parameters=step.parameters,
        timeout=step.timeout or timeout,
        retries=retries if step.retries is None else step.retries,
        fallback=_fallback(step, defaults),
        depends_on=depends_on,
        where=where,
        when=condition(step.when) if step.when else None,
        optional=step.optional,
        use_stale=step.use_stale,
        retry_tool_errors=step.retry_tool_errors,
        sensitive=step.sensitive,
        cache=step.cache.ttl if isinstance(step.cache, StepCache) else step.cache,
    )


def _fallback(step: Step, defaults: Defaults) -> PlannedFallback | None:
    # A fallback call gets its own service's budget, not the step's.
    if step.fallback is None:
        return None
    timeout, retries = defaults(step.fallback.service)
    parameters = step.parameters if step.fallback.parameters is None else step.fallback.parameters
    return PlannedFallback(step.fallback.service, step.fallback.tool or step.tool, parameters, timeout, retries)


def _check_unique(steps: list[PlannedStep], where: str, source: str | None) -> None:
    seen: set[str] = set()
    for step in steps:
        if step.id in seen:
            raise ConfigError(f"{step.where}, field 'id': duplicate step id '{step.id}'", source=source)
        seen.add(step.id)


def _check_cycles(graph: Graph, where: str, source: str | None) -> None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(step_id: str) -> None:
        state[step_id] = 1
        path.append(step_id)
        for dep in graph.index[step_id].depends_on:
            if state.get(dep) == 1:
                cycle = [*path[path.index(dep) :], dep]
                raise ConfigError(
                    f"{where}: dependency cycle {' -> '.join(reversed(cycle))} (field 'depends_on')",
                    source=source,
                )
            if dep not in state:
                visit(dep)
        path.pop()
        state[step_id] = 2

    for step in graph.steps:
        if step.id not in state:
            visit(step.id)


def _references(value: Any, field: str, where: str, source: str | None) -> dict[str, str]:
    try:
        return references(value, field)
    except ExpressionError as exc:
        raise ExpressionError(f"{where}, {exc}", source=source) from exc


def _check_references(graph: Graph, where: str, source: str | None) -> None:
    for step in graph.steps:
        upstream = graph.ancestors(step.id)
        fields = {"parameters": step.parameters, "when": step.when}  # step.when is already a template
        for name, path in _references(fields, "", step.where, source).items():
            if name not in graph.index:
                raise ConfigError(f"{step.where}, field '{path}': reference to unknown step '{name}'", source=source)
            if name not in upstream:
                raise ConfigError(
                    f"{step.where}, field '{path}': reads step '{name}', which does not run before it "
                    f"(a later or parallel step); add '{name}' to depends_on or move the step",
                    source=source,
                )
    for name, path in _references(graph.output, "output", where, source).items():
        if name not in graph.index:
            raise ConfigError(f"{where}, field '{path}': reference to unknown step '{name}'", source=source)
