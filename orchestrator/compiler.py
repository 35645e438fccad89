"""Compile a step graph into a Celery canvas that keeps its parallelism.

A series-parallel graph maps exactly: series → `chain`, parallel → `group`, and Celery turns a group
followed by a task into a `chord` whose callback runs after every branch. Other shapes (an "N" of
dependencies) are split at their source steps: the sources run as a group, then the rest — every
dependency still holds, though a step may wait for a source it does not depend on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from celery import chain, group
from celery.canvas import Signature

from orchestrator.workflow import Graph


@dataclass(frozen=True)
class Series:
    items: tuple[Shape, ...]


@dataclass(frozen=True)
class Parallel:
    items: tuple[Shape, ...]


Shape = str | Series | Parallel


def shape(graph: Graph) -> Shape | None:
    """The series-parallel shape of the graph's steps (None for an empty workflow)."""
    if not graph.steps:
        return None
    closure = {step.id: graph.ancestors(step.id) for step in graph.steps}
    return _decompose([step.id for step in graph.steps], graph, closure)


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
    its item (a one-task group would hand back a list where a value is expected); chains are flat.
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
        return group(items)
    flat: list[Signature] = []
    for item in items:
        flat.extend(item.tasks if isinstance(item, chain) else [item])
    return chain(*flat)
