"""Runs: start one and follow it or hand it to the workers, look at it, cancel it; check a file before running."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from orchestrator.cli.common import (
    EXIT_FAILED,
    _config,
    _config_or_empty,
    _errors,
    _fail,
    _orchestrator,
    _redis_address,
    _settings,
    config_option,
    main,
    redis_down,
    run_shown,
)
from orchestrator.errors import RedisUnreachable, RunTimeout

if TYPE_CHECKING:
    from orchestrator.api import Run
    from orchestrator.config import Config
    from orchestrator.results import RunResult


def _params(pairs: tuple[str, ...], params_json: str | None) -> dict[str, Any]:
    from orchestrator.params import parse_json, parse_pair

    params: dict[str, Any] = parse_json(params_json) if params_json else {}
    params.update(parse_pair(pair) for pair in pairs)
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
key_option = click.option("--idempotency-key", "key", metavar="KEY",
                          help="a KEY seen in the last 24 h gets the run it started, not another")  # fmt: skip


@main.command()
@click.argument("workflow")
@config_option
@param_option
@params_option
@click.option("--json", "as_json", is_flag=True, help="print the RunResult as JSON")
@click.option("--timeout", type=float, default=None, help="give up waiting after this many seconds")
@click.option("--reveal", is_flag=True, help="show sensitive values (sealed ones) instead of [sealed]")
@key_option
def run(workflow: str, config_path: str | None, pairs: tuple[str, ...], params_json: str | None, as_json: bool,
        timeout: float | None, reveal: bool, key: str | None) -> None:  # fmt: skip
    """Run WORKFLOW (a name in the configuration or a workflow file), showing each step, then its result."""
    from orchestrator.security.identity import IdentitySettings

    with _errors():
        config = _config(config_path, workflow)
        name, params = _workflow_name(config, workflow), _params(pairs, params_json)  # bad input fails first
        with _orchestrator(config) as orchestrator:
            access = orchestrator.access_control() if reveal else None
            if access is not None:  # the handle opens what its starter sees
                access.require(IdentitySettings().token, "reveal", f"workflow:{name}")
            result = _follow(orchestrator.start(name, params, idempotency_key=key), timeout, reveal)
            _print_result(result, as_json)
    sys.exit(_exit_code(result))


def _follow(handle: Run, timeout: float | None, reveal: bool) -> RunResult:
    """Show a run just started as it goes, until it ends; RunTimeout when it outlasts `timeout`."""
    from orchestrator.progress import follow
    from workers.outage import give_up

    click.echo(f"run {handle.id} enqueued", err=True)
    try:
        result = follow(lambda: handle.status(reveal), sys.stderr, timeout)
    except Exception as exc:  # Redis went away: the run may go on; say how to look it up later
        if not redis_down(exc):
            raise
        later = f" (following run {handle.id}; look it up later: mcp-orchestrator status {handle.id})"
        give_up()  # the outage outlasted its bound: closing does not wait it out again, command by command
        raise RedisUnreachable(_redis_address(), later) from exc
    if not result.done:
        raise RunTimeout(
            f"run {handle.id} did not finish within {timeout:g} s; see: mcp-orchestrator status {handle.id}"
        )
    return result


@main.command()
@click.argument("run_id")
@config_option
@click.option("--from", "from_step", metavar="STEP", help="run STEP and every step after it again, too")
@click.option("--json", "as_json", is_flag=True, help="print the RunResult as JSON")
@click.option("--timeout", type=float, default=None, help="give up waiting after this many seconds")
@click.option("--reveal", is_flag=True, help="show sensitive values (sealed ones) instead of [sealed]")
@click.option("--no-wait", is_flag=True, help="print the new run's id and return (needs REDIS_URL and workers)")
def resume(run_id: str, config_path: str | None, from_step: str | None, as_json: bool, timeout: float | None,
           reveal: bool, no_wait: bool) -> None:  # fmt: skip
    """Run an ended run RUN_ID again as a new run: the steps that succeeded keep their outputs, the others run
    again (with --from, STEP and every step after it too); shown as `run` shows a run."""
    with _errors():
        config = _config(config_path)
        if no_wait and not _settings().redis_url:
            _fail("--no-wait hands the run to separate workers and returns: set REDIS_URL")
        with _orchestrator(config) as orchestrator:
            handle = orchestrator.resume(run_id, from_step)
            if no_wait:
                click.echo(handle.id)
                return
            result = _follow(handle, timeout, reveal)
            _print_result(result, as_json)
    sys.exit(_exit_code(result))


@main.command()
@click.argument("workflow")
@config_option
@param_option
@params_option
@key_option
def enqueue(workflow: str, config_path: str | None, pairs: tuple[str, ...], params_json: str | None,
            key: str | None) -> None:  # fmt: skip
    """Start WORKFLOW on the workers and print its run id (needs REDIS_URL and running workers)."""
    with _errors():
        config = _config(config_path, workflow)
        if not _settings().redis_url:
            _fail("enqueue hands the run to separate workers and returns: set REDIS_URL, or use `run`")
        name, params = _workflow_name(config, workflow), _params(pairs, params_json)  # bad input fails first
        with _orchestrator(config) as orchestrator:
            click.echo(orchestrator.enqueue(name, params, idempotency_key=key).id)


@main.command()
@run_shown
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
        orchestrator = _orchestrator(config)  # what `run` checks too: timeouts against the visibility timeout
        graphs = {name: orchestrator.graph(name) for name in config.workflows} if is_config else {}
        if not is_config:
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
