"""The project's own files stay in step: Procfile and docker-compose serve every example service, and the
README's two commands are the ones CI runs."""

from __future__ import annotations

import re
import shlex

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
