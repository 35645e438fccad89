"""Runs: start one and follow it or hand it to the workers, look at it, cancel it; check a file before running."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import yaml

from orchestrator.cli.common import (
    EXIT_FAILED,
    _config,
    _config_or_empty,
    _errors,
    _fail,
    _orchestrator,
    _settings,
    config_option,
    main,
)
from orchestrator.errors import RunTimeout

if TYPE_CHECKING:
    from orchestrator.config import Config
    from orchestrator.results import RunResult


def _params(pairs: tuple[str, ...], params_json: str | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if params_json:
        loaded = json.loads(Path(params_json[1:]).read_text() if params_json.startswith("@") else params_json)
        if not isinstance(loaded, dict):
            _fail("--params must be a JSON object")
        params.update(loaded)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            _fail(f"--param {pair!r}: expected KEY=VALUE")
        params[key] = yaml.safe_load(value) if value else ""
    return params


def _workflow_name(config: Config, workflow: str) -> str:
    """A workflow file that is also the configuration stands for its one workflow."""
    path = Path(workflow)
    if config.source and path.exists() and path.resolve() == Path(config.source).resolve():
        if len(config.workflows) != 1:
            _fail(f"{workflow} holds {len(config.workflows)} workflows; name one of them")
        return next(iter(config.workflows))
    return workflow


def _print_result(result: RunResult, as_json: bool) -> None:
    if as_json:
        click.echo(result.model_dump_json(indent=2))
        return
    took = f" in {result.finished_at - result.created_at:.2f} s" if result.finished_at and result.created_at else ""
    click.echo(f"run {result.id} {result.status}{took}")
    for error in result.errors:
        click.echo(f"  ✘ {error.step} ({error.service}.{error.tool}) {error.type}: {error.message}")
    click.echo(json.dumps(result.output, indent=2, default=str))


def _exit_code(result: RunResult) -> int:
    return 0 if result.succeeded else EXIT_FAILED


param_option = click.option("--param", "-p", "pairs", multiple=True, metavar="KEY=VALUE",
                            help="a workflow parameter; VALUE is read as YAML (repeatable)")  # fmt: skip
params_option = click.option("--params", "params_json", metavar="JSON|@FILE", help="parameters as a JSON object")


@main.command()
@click.argument("workflow")
@config_option
@param_option
@params_option
@click.option("--json", "as_json", is_flag=True, help="print the RunResult as JSON")
@click.option("--timeout", type=float, default=None, help="give up waiting after this many seconds")
@click.option("--reveal", is_flag=True, help="show sensitive values (sealed ones) instead of [sealed]")
def run(workflow: str, config_path: str | None, pairs: tuple[str, ...], params_json: str | None, as_json: bool,
        timeout: float | None, reveal: bool) -> None:  # fmt: skip
    """Run WORKFLOW (a name in the configuration or a workflow file), showing each step, then its result."""
    from orchestrator.progress import follow

    with _errors():
        config = _config(config_path, workflow)
        name, params = _workflow_name(config, workflow), _params(pairs, params_json)  # bad input fails first
        with _orchestrator(config) as orchestrator:
            handle = orchestrator.enqueue(name, params)
            click.echo(f"run {handle.id} enqueued", err=True)
            result = follow(lambda: handle.status(reveal), sys.stderr, timeout)
            if not result.done:
                raise RunTimeout(
                    f"run {handle.id} did not finish within {timeout:g} s; see: mcp-orchestrator status {handle.id}"
                )
            _print_result(result, as_json)
    sys.exit(_exit_code(result))


@main.command()
@click.argument("workflow")
@config_option
@param_option
@params_option
def enqueue(workflow: str, config_path: str | None, pairs: tuple[str, ...], params_json: str | None) -> None:
    """Start WORKFLOW on the workers and print its run id (needs REDIS_URL and running workers)."""
    with _errors():
        config = _config(config_path, workflow)
        if not _settings().redis_url:
            _fail("enqueue hands the run to separate workers and returns: set REDIS_URL, or use `run`")
        name, params = _workflow_name(config, workflow), _params(pairs, params_json)  # bad input fails first
        with _orchestrator(config) as orchestrator:
            click.echo(orchestrator.enqueue(name, params).id)


@main.command()
@click.argument("run_id")
@config_option
@click.option("--json", "as_json", is_flag=True, help="print the RunResult as JSON")
@click.option("--reveal", is_flag=True, help="show sensitive values (sealed ones) instead of [sealed]")
def status(run_id: str, config_path: str | None, as_json: bool, reveal: bool) -> None:
    """Show a run by id."""
    with _errors():
        with _orchestrator(_config_or_empty(config_path)) as orchestrator:
            result = orchestrator.status(run_id, reveal)
        _print_result(result, as_json)
    sys.exit(0 if result.status in ("succeeded", "pending", "running") else EXIT_FAILED)


@main.command()
@click.argument("run_id")
@config_option
def cancel(run_id: str, config_path: str | None) -> None:
    """Cancel a run: no further step starts and in-flight calls are cancelled; finished steps are kept."""
    with _errors(), _orchestrator(_config_or_empty(config_path)) as orchestrator:
        result = orchestrator.cancel(run_id)
    click.echo(f"run {run_id} {result.status}")
    sys.exit(0 if result.status == "cancelled" else EXIT_FAILED)


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@config_option
def validate(file: str, config_path: str | None) -> None:
    """Check a configuration or workflow file without running anything."""
    from orchestrator.compiler import shape
    from orchestrator.config import load_config, read_document

    with _errors():
        data = read_document(file)
        is_config = isinstance(data, dict) and bool({"servers", "mcpServers", "services"} & set(data))
        config = load_config(file) if is_config else _config(config_path)
        graphs = config.check() if is_config else {}
        if not is_config:
            orchestrator = _orchestrator(config)
            graphs = {file: orchestrator.graph(file)}
        for name, graph in graphs.items():
            click.echo(f"ok: workflow '{name}': {len(graph.steps)} steps, canvas {_describe(shape(graph))}")
        click.echo(f"ok: {file}")


def _describe(node: Any) -> str:
    if node is None:
        return "(empty)"
    if isinstance(node, str):
        return node
    joiner = " → " if type(node).__name__ == "Series" else " | "
    inner = joiner.join(_describe(item) for item in node.items)
    return f"[{inner}]" if joiner == " | " else inner
