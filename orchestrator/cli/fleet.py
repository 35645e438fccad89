"""The fleet: workers, the health beat, the services' instances and their tools, instances added at run time."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from orchestrator.cli.common import _config, _errors, _fail, _orchestrator, _redis_url, _settings, config_option, main

if TYPE_CHECKING:
    from orchestrator.config import Config


@main.command()
@config_option
@click.option("--service", "-s", "names", multiple=True, help="only this service (repeatable)")
@click.option("--json", "as_json", is_flag=True, help="print the tools as JSON")
def discover(config_path: str | None, names: tuple[str, ...], as_json: bool) -> None:
    """Ask every service (on its own workers) for its tools; enqueue then checks steps against them."""
    with _errors(), _orchestrator(_config(config_path)) as orchestrator:
        found = orchestrator.fleet.discover(list(names) or None)
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    for service, tools in found.items():
        click.echo(f"{service}: {len(tools)} tools: {', '.join(tools)}")


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="print the states as JSON")
def services(config_path: str | None, as_json: bool) -> None:
    """Every instance of every service: health, latency, tools, calls in flight, breaker state."""
    with _errors(), _orchestrator(_config(config_path)) as orchestrator:
        states = orchestrator.fleet.services()
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
        orchestrator.fleet.register(service, instance, url, pairs)
    click.echo(f"registered {service}/{instance} at {url}")


@main.command()
@click.argument("service")
@click.argument("instance")
@config_option
def deregister(service: str, instance: str, config_path: str | None) -> None:
    """Remove INSTANCE, registered at run time, from SERVICE; it takes no further calls."""
    with _errors(), _orchestrator(_config(config_path)) as orchestrator:
        orchestrator.fleet.deregister(service, instance)
    click.echo(f"deregistered {service}/{instance}")


@main.group()
def cache() -> None:
    """The response cache: answers of read-only tools kept fleet-wide (a service's `cache:`)."""


@cache.command("clear")
@click.argument("service", required=False)
@click.argument("tool", required=False)
@config_option
def cache_clear(service: str | None, tool: str | None, config_path: str | None) -> None:
    """Drop the kept answers of every service, of SERVICE, or of its TOOL (admin on the service)."""
    with _errors(), _orchestrator(_config(config_path)) as orchestrator:
        dropped = orchestrator.fleet.clear_cache(service, tool)
    scope = f"{service}.{tool}" if tool else service or "every service"
    click.echo(f"dropped {dropped} cached answer(s) of {scope}")


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
    from orchestrator.security.access import alert_settings
    from orchestrator.security.alerts import watch
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
    settings.worker_concurrency = concurrency  # a batch message's calls share this many threads (workers/runtime.py)
    queues = ",".join([*(queue_for(name) for name in services), control_queue()])
    name = f"{'+'.join(services)}-{os.getpid()}@%h"
    # Without mingle: at start a worker would wait a second for the others to send their revoked task ids and
    # logical clocks, and neither is used here (a run is cancelled through the run store, not Celery's revoke).
    app.worker_main(["worker", "-Q", queues, "-P", "threads", "-c", str(concurrency), "-n", name,
                     "--without-mingle", "--loglevel", loglevel])  # fmt: skip
