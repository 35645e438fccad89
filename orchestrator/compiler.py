"""Compile a step graph into a Celery canvas that keeps its parallelism.

A series-parallel graph maps exactly: series → `chain`, parallel → `group`, and Celery turns a group
followed by a task into a `chord` whose callback runs after every branch. Other shapes (an "N" of
dependencies) are split at their source steps: the sources run as a group, then the rest — every
dependency still holds, though a step may wait for a source it does not depend on.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import chain, group
from celery.canvas import Signature, _chain, _chord

from orchestrator.batching import Batching
from orchestrator.expressions import references
from orchestrator.messages import PlannedStep, StepCall
from orchestrator.security.sealing import sealer
from orchestrator.workflow import Graph
from workers.app import app, batch_signature, control_queue, step_signature


@dataclass(frozen=True)
class Series:
    items: tuple[Shape, ...]


@dataclass(frozen=True)
class Parallel:
    items: tuple[Shape, ...]


Shape = str | Series | Parallel


def shape(graph: Graph, only: set[str] | None = None) -> Shape | None:
    """The series-parallel shape of the graph's steps, or of those in `only` (None when there are none). `only`
    holds every step that depends on one of its steps (a resume's steps to run again), so the others' outputs are
    there before any of its steps starts."""
    ids = [step.id for step in graph.steps if only is None or step.id in only]
    if not ids:
        return None
    closure = {step_id: graph.ancestors(step_id) for step_id in ids}
    return _decompose(ids, graph, closure)


def _decompose(ids: list[str], graph: Graph, closure: dict[str, set[str]]) -> Shape:
    if len(ids) == 1:
        return ids[0]
    components = _components(ids, graph)
    if len(components) > 1:
        return Parallel(tuple(_decompose(part, graph, closure) for part in components))
    order = _topological(ids, closure)
    for cut in range(1, len(order)):
        before, after = order[:cut], order[cut:]
        if all(set(before) <= closure[step] for step in after):
            return _series(_decompose(before, graph, closure), _decompose(after, graph, closure))
    members = set(ids)
    sources = [step for step in ids if not (closure[step] & members)]
    rest = [step for step in ids if step not in sources]
    return _series(_decompose(sources, graph, closure), _decompose(rest, graph, closure))


def _series(first: Shape, second: Shape) -> Series:
    items: list[Shape] = []
    for part in (first, second):
        items.extend(part.items if isinstance(part, Series) else (part,))
    return Series(tuple(items))


def _components(ids: list[str], graph: Graph) -> list[list[str]]:
    """Weakly connected components of the sub-graph on ids, each in definition order."""
    members = set(ids)
    parent = {step: step for step in ids}

    def root(step: str) -> str:
        while parent[step] != step:
            parent[step] = parent[parent[step]]
            step = parent[step]
        return step

    for step in ids:
        for dep in graph.index[step].depends_on:
            if dep in members:
                parent[root(step)] = root(dep)
    groups: dict[str, list[str]] = {}
    for step in ids:
        groups.setdefault(root(step), []).append(step)
    return list(groups.values())


def _topological(ids: list[str], closure: dict[str, set[str]]) -> list[str]:
    # Fewer ancestors first keeps definition order among independent steps (sort is stable).
    return sorted(ids, key=lambda step: len(closure[step] & set(ids)))


def to_canvas(node: Shape | None, task: Callable[[str], Signature], finish: Signature) -> Signature:
    """The Celery canvas for a shape, ending in `finish` (which makes a final group a chord).

    Celery pitfalls handled here: an empty workflow is just `finish`; a single-item group or chain is
    its item (a one-task group would hand back a list where a value is expected); chains are flat; and a
    chain that ends in a group inside another group keeps that group's results (see `_keep_results`).
    """
    if node is None:
        return finish
    body = _signature(node, task)
    parts = list(body.tasks) if isinstance(body, chain) else [body]
    return chain(*parts, finish)


def _signature(node: Shape, task: Callable[[str], Signature]) -> Signature:
    if isinstance(node, str):
        return task(node)
    items = [_signature(item, task) for item in node.items]
    if len(items) == 1:
        return items[0]
    if isinstance(node, Parallel):
        for item, signature in zip(node.items, items, strict=True):
            if isinstance(item, Series) and isinstance(item.items[-1], Parallel):
                _keep_results(signature.tasks[-1])
        return group(items)
    flat: list[Signature] = []
    for item in items:
        flat.extend(item.tasks if isinstance(item, chain) else [item])
    return chain(*flat)


def _keep_results(signature: Signature) -> None:
    """Store the results of every task under signature, though tasks ignore theirs by default.

    A chord whose header holds a chain ending in a group joins that group's results from the result
    backend; without them the chord would wait forever.
    """
    if isinstance(signature, _chord):
        for member in [*signature.tasks, signature.body]:
            _keep_results(member)
    elif isinstance(signature, group | chain):
        for member in signature.tasks:
            _keep_results(member)
    else:
        signature.set(ignore_result=False)


def compile_run(run_id: str, graph: Graph, after_fallback: str | None = None, caller: str | None = None,
                only: set[str] | None = None, batching: Batching | None = None) -> Signature:  # fmt: skip
    """The whole canvas of one run: every step's call (or those in `only`, see `shape`), then `mcpo.finish`.

    `after_fallback` names the run this one stands in for: its finish then closes that run too. `caller` is
    the run's caller token (access control on), carried in every step's message for the worker to check.
    `batching` says which parallel calls go in batch messages (orchestrator/batching.py); None: none do.
    """
    options: dict[str, Any] = {"after_fallback": after_fallback} if after_fallback else {}
    finish = app.signature("mcpo.finish", args=(run_id,), kwargs=options, immutable=True, queue=control_queue())
    canvas = to_canvas(
        shape(graph, only),
        lambda step_id: step_signature(step_call(run_id, graph.index[step_id], caller, graph.sensitive)),
        finish,
    )
    _relayed(canvas)
    if batching is not None:
        _batched(canvas, batching)
    return canvas


def _relayed(signature: Signature) -> None:
    """Drop the caller token of every call that directly follows another call in a chain: the worker of the one
    before hands its token on (tasks/calls.py) as it sends the next message. A chain's first message carries every
    later step, so with a token in each step the bytes a chain sends grew with the square of its length."""
    members: list[Signature] = []
    if isinstance(signature, _chain):
        members = list(signature.tasks)
        for before, after in itertools.pairwise(members):
            if _is_call(before) and _is_call(after):
                after.kwargs.pop("caller", None)
    elif isinstance(signature, _chord):
        header = signature.tasks
        members = [*(header.tasks if isinstance(header, group) else header), signature.body]
    elif isinstance(signature, group):
        members = list(signature.tasks)
    for member in members:
        _relayed(member)


def _batched(signature: Signature, batching: Batching) -> None:
    """Put the calls of every chord header in batches where batching says so: a chord's, and a group followed by
    another part of its chain (Celery makes it a chord's header when the chain is sent). A group that ends its
    chain is not: Celery joins it, with no count a call leaving its batch could join."""
    members: list[Signature] = []
    if isinstance(signature, _chain):
        members = list(signature.tasks)
        for member in members[:-1]:
            if isinstance(member, group):
                member.tasks = _batches(list(member.tasks), batching)
    elif isinstance(signature, _chord):
        signature.tasks = _batches(list(signature.tasks), batching)
        members = [*signature.tasks, signature.body]
    elif isinstance(signature, group):
        members = list(signature.tasks)
    for member in members:
        _batched(member, batching)


def _batches(members: list[Signature], batching: Batching) -> list[Signature]:
    """A group's members with its calls to each batching service in batches; other members as they were."""
    kept = [member for member in members if not _is_call(member)]
    calls: dict[str, list[Signature]] = {}
    for member in members:
        if _is_call(member):
            calls.setdefault(member.kwargs["service"], []).append(member)
    for service, signatures in calls.items():
        start = 0
        for size in batching.sizes(service, len(signatures)) or [1] * len(signatures):
            part = signatures[start : start + size]
            start += size
            kept += [batch_signature([signature.kwargs for signature in part])] if size > 1 else part
    return kept


def _is_call(signature: Signature) -> bool:
    return not isinstance(signature, _chain | group | _chord) and signature.task == "mcpo.call"


def step_call(run_id: str, step: PlannedStep, caller: str | None = None, opens: bool = False) -> StepCall:
    """The task message of one step, for one run: the data it reads found, a sensitive step's arguments (and
    its fallback's) sealed. `opens`: the run holds sealed data the worker must open to read."""
    return StepCall(
        run_id=run_id,
        step_id=step.id,
        service=step.service,
        tool=step.tool,
        arguments=_sealed(step.parameters, step.sensitive),
        timeout=step.timeout,
        retries=step.retries,
        depends_on=list(step.depends_on),
        reads=sorted(references({"parameters": step.parameters, "when": step.when}, "")),
        when=step.when,
        optional=step.optional,
        use_stale=step.use_stale,
        retry_tool_errors=step.retry_tool_errors,
        fallback=_fallback(step),
        caller=caller,
        sensitive=step.sensitive,
        opens=opens,
        cache=step.cache,
    )


def _fallback(step: PlannedStep) -> dict[str, Any] | None:
    if step.fallback is None:
        return None
    fallback = step.fallback
    arguments = _sealed(fallback.parameters, step.sensitive)
    return {"service": fallback.service, "tool": fallback.tool, "arguments": arguments,
            "timeout": fallback.timeout, "retries": fallback.retries}  # fmt: skip


def _sealed(arguments: dict[str, Any], sensitive: bool) -> dict[str, Any] | str:
    return sealer(create=True).seal(arguments) if sensitive else arguments
