"""The fleet's administration through the Python API: services, their instances, health and discovery
(`orch.fleet`), apart from running workflows (`Orchestrator`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import ValidationError

from orchestrator.config import Config, HttpServer, validation_message
from orchestrator.errors import ConfigError
from orchestrator.health import HISTORY, Health, HealthBook
from orchestrator.limits import check_identifier
from orchestrator.registry import Registry
from orchestrator.responses import ResponseCache
from orchestrator.results import InstanceStatus
from workers.app import app, queue_for
from workers.balancer import Balancer

if TYPE_CHECKING:
    from orchestrator.api import Orchestrator


class Fleet:
    """Every service of an orchestrator's configuration: discovery, instance status, instances added at run
    time, and health history. Access control applies as for runs (`read`, `register`, `deregister`)."""

    def __init__(self, orchestrator: Orchestrator) -> None:
        self._orch = orchestrator

    @property
    def config(self) -> Config:
        return self._orch.config

    def _registry(self) -> Registry:
        store = self._orch.connect()
        return Registry(store.redis, store.namespace)

    def discover(self, services: list[str] | None = None, timeout: float = 60) -> dict[str, list[str]]:
        """Run a health beat on each service's workers now: every instance is asked for its tools (names of
        those all its instances offer returned); `enqueue` then checks steps against them."""
        names = services or sorted(self.config.services)
        for name in names:
            self._orch._allow("read", f"service:{name}")
        self._orch.connect()  # and starts the embedded default, whose workers the beats need
        self._orch._ensure_workers(set(names))
        asked = {
            name: app.signature("mcpo.health", args=(name,), queue=queue_for(name)).apply_async() for name in names
        }
        for result in asked.values():
            # The embedded default's in-process worker marks this process as running tasks; this waits on no task.
            result.get(timeout=timeout, disable_sync_subtasks=False)
        registry = self._registry()
        return {name: sorted((registry.tools(name) or ({}, 0.0))[0]) for name in names}

    def services(self) -> list[InstanceStatus]:
        """Every instance of every service: health, latency, tools, calls in flight, and its breaker's state."""
        readable = self._readable_services()
        store = self._orch.connect()
        balancer = Balancer(self.config, store.redis, store.namespace)
        registry = self._registry()
        return [status for name in readable for status in _instances(name, balancer, registry.discovered(name))]

    def health_history(self, service: str, instance: str, count: int = 100, since: float | None = None) -> list[Health]:
        """The health beats of one instance, newest first: the last 100 from Redis, older ones (or any since
        a time) from the SQL records."""
        self._orch._allow("read", f"service:{service}")
        if since is None and count <= HISTORY:
            store = self._orch.connect()
            return HealthBook(store.redis, store.namespace).history(service, instance, count)
        return self._orch.records.health(service, instance, since, count)

    def register(self, service: str, instance: str, url: str, headers: dict[str, str] | None = None) -> None:
        """Add an instance of a service at run time, reached over Streamable HTTP; workers use it at once."""
        self._orch._allow("register", f"service:{service}")
        self._check_instance_name(service, instance)
        try:
            server = HttpServer(url=url, headers=headers or {})
        except ValidationError as exc:
            raise ConfigError(f"instance '{instance}': {validation_message(exc)}") from exc
        self._registry().register(service, instance, server)

    def deregister(self, service: str, instance: str) -> None:
        """Remove an instance registered at run time; it takes no further calls."""
        self._orch._allow("deregister", f"service:{service}")
        self._check_instance_name(service, instance)
        if not self._registry().deregister(service, instance):
            raise ConfigError(f"service '{service}' has no instance '{instance}' registered at run time")

    def clear_cache(self, service: str | None = None, tool: str | None = None) -> int:
        """Drop the response cache's answers: of every service, of one, or of one of its tools; how many."""
        if service is not None and service not in self.config.services:
            known = ", ".join(sorted(self.config.services)) or "none"
            raise ConfigError(f"unknown service '{service}' (services: {known})", source=self.config.source)
        self._orch._allow("admin", f"service:{service or '*'}")
        store = self._orch.connect()
        return ResponseCache(store.redis, store.namespace).clear(service, tool)

    def _check_instance_name(self, service: str, instance: str) -> None:
        check_identifier(instance, "the instance's name")
        if service not in self.config.services:
            known = ", ".join(sorted(self.config.services)) or "none"
            raise ConfigError(f"unknown service '{service}' (services: {known})", source=self.config.source)
        if instance in self.config.servers:
            raise ConfigError(
                f"'{instance}' is a server of the configuration; an instance registered at run time needs a name "
                "of its own",
                source=self.config.source,
            )

    def _readable_services(self) -> list[str]:
        names = sorted(self.config.services)
        access = self._orch.access_control()
        if access is None or not names:
            return names
        identity = access.authenticate(self._orch._token)
        readable = [name for name in names if access.policy.allows(identity.roles, "read", f"service:{name}")]
        if not readable:
            access.policy.check(identity, "read", "service:*")
        return readable


def _instances(service: str, balancer: Balancer, tools: dict[str, int]) -> list[InstanceStatus]:
    view = balancer.view(service)
    in_flight = balancer.in_flight(service, list(view.servers))
    statuses = []
    for name in view.servers:
        breaker = balancer.breaker(service, name)
        snap = breaker.snapshot()
        health = view.health.get(name)
        statuses.append(InstanceStatus(
            service=service, instance=name, registered=name not in balancer.config.servers,
            health=health.status if health else "unknown", latency_ms=health.latency_ms if health else None,
            last_seen=health.last_seen if health else None, tools=tools.get(name), in_flight=in_flight[name],
            breaker=snap.state if breaker.settings.enabled else "disabled", failure_rate=snap.failure_rate,
            slow_rate=snap.slow_rate, calls=snap.calls, retry_at=snap.retry_at,
        ))  # fmt: skip
    return statuses
