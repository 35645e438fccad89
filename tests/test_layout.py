"""The project's own files stay in step: Procfile and docker-compose serve every example service, the
README's two commands are the ones CI runs, and the code's modules import one another without a cycle."""

from __future__ import annotations

import ast
import re
import shlex
from collections import deque
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path

import yaml

from orchestrator import load_config

from .conftest import ROOT, SERVICES


def served(command: str) -> set[str]:
    words = shlex.split(command)
    return {words[i + 1] for i, word in enumerate(words) if word in ("--service", "-s")}


def test_procfile_runs_a_worker_for_every_example_service_and_flower() -> None:
    entries = dict(line.split(":", 1) for line in (ROOT / "Procfile").read_text().splitlines()
                   if line and not line.startswith("#"))  # fmt: skip
    services = set().union(*(served(command) for command in entries.values()))
    assert services == set(load_config(SERVICES).services)
    assert any("flower" in command for command in entries.values())
    assert [command.split()[:2] for command in entries.values() if "beat" in command] == [["mcp-orchestrator", "beat"]]


def test_compose_file_runs_the_same_fleet_on_redis_and_postgres() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    containers = compose["services"]
    assert {"redis", "postgres", "flower", "beat"} <= set(containers)
    assert containers["beat"]["command"].split()[:2] == ["mcp-orchestrator", "beat"]
    workers = {name: spec for name, spec in containers.items() if name.startswith("worker-")}
    services = set().union(*(served(spec["command"]) for spec in workers.values()))
    assert services == set(load_config(SERVICES).services)
    for spec in workers.values():
        assert "REDIS_URL" in spec["environment"] and "MCPO_CONFIG" in spec["environment"]
        assert "scale" not in spec and "container_name" not in spec  # `--scale worker-<service>=N` must work
    procfile_workers = {line.split(":", 1)[0] for line in (ROOT / "Procfile").read_text().splitlines()
                        if line.startswith("worker-")}  # fmt: skip
    assert procfile_workers == set(workers)


def test_ci_runs_the_readme_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = dict(re.findall(r"<!-- (main-command|test-command) -->\n```bash\n(.+?)\n```", readme))
    assert set(blocks) == {"main-command", "test-command"}
    assert "pip install" in blocks["main-command"] and "pytest" in blocks["test-command"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "readme_command test-command" in ci and "readme_command main-command" in ci
    assert readme.index("<!-- main-command -->") < 1500  # on the README's first screen


PACKAGES = ("orchestrator", "workers", "tasks")


def test_modules_import_one_another_without_a_cycle() -> None:
    """No cycle in the import graph of orchestrator/ (its subpackages too), workers/, tasks/ and celeryconfig.py.

    An import statement counts wherever it is, in a function too: an import deferred to call time to dodge a
    cycle is still one. Imports under `if TYPE_CHECKING:` do not count, as they never run; nor do modules named
    in strings (`import_module`, Celery's `include`)."""
    graph = import_graph()
    found = [_describe(graph, group) for group in cyclic_groups(graph)]
    assert not found, "import cycles:\n" + "\n".join(found)


def import_graph() -> dict[str, set[str]]:
    """Each project module and the project modules it imports."""
    paths = [ROOT / "celeryconfig.py"]
    for package in PACKAGES:
        paths += sorted((ROOT / package).rglob("*.py"))
    modules = {_module_name(path): path for path in paths}
    return {module: _imported(module, path, modules) - {module} for module, path in modules.items()}


def cyclic_groups(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import one another, directly or not (strongly connected components)."""
    reach = {module: _reachable(graph, module) for module in graph}
    groups: list[list[str]] = []
    for module in sorted(graph):
        if module in reach[module] and not any(module in group for group in groups):
            groups.append(sorted(other for other in reach[module] if module in reach[other]))
    return groups


def _describe(graph: dict[str, set[str]], group: list[str]) -> str:
    """The shortest cycle through the group's first module, and the group's other modules, if any."""
    cycle = _shortest_cycle(graph, group[0])
    others = [module for module in group if module not in cycle]
    return "  " + " -> ".join([*cycle, group[0]]) + (f"  (with {', '.join(others)} in the same knot)" if others else "")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(module: str, path: Path, modules: Collection[str]) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: list[str] = []
    for statement in _imports(ast.parse(path.read_text(), str(path))):
        if isinstance(statement, ast.Import):
            names += [alias.name for alias in statement.names]
        else:
            names += [f"{_source(statement, package)}.{alias.name}" for alias in statement.names]
    return {found for name in names if (found := _project_module(name, modules)) is not None}


def _imports(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
        return
    if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
        children: Iterable[ast.AST] = node.orelse
    else:
        children = ast.iter_child_nodes(node)
    for child in children:
        yield from _imports(child)


def _source(statement: ast.ImportFrom, package: str) -> str:
    """The module `from … import` reads from, a relative one resolved against the importing package."""
    if not statement.level:
        return statement.module or ""
    parts = package.split(".")[: len(package.split(".")) - statement.level + 1]
    return ".".join([*parts, *([statement.module] if statement.module else [])])


def _project_module(name: str, modules: Collection[str]) -> str | None:
    """The project module an import of name runs: the longest prefix of name that is one (`from orchestrator
    import load_config` imports the package `orchestrator`)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = list(graph[start])
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += graph[module]
    return seen


def _shortest_cycle(graph: dict[str, set[str]], start: str) -> list[str]:
    """The modules of a shortest cycle from start back to it, start first (breadth-first)."""
    came_from: dict[str, str] = {}
    todo = deque([start])
    while todo:
        module = todo.popleft()
        for imported in sorted(graph[module]):
            if imported == start:
                path = [module]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return path[::-1]
            if imported not in came_from:
                came_from[imported] = module
                todo.append(imported)
    raise AssertionError(f"{start} is in no cycle")
