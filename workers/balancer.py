"""Choosing the instance of a service that takes a call: least in flight among the healthy ones.

An instance whose last health beat failed gets no traffic; one whose breaker refuses is passed over; one
that just failed a call (here, or in another worker) is used only when no other is left. Among the rest,
the instance with the fewest calls in flight across the whole fleet wins, ties taken in turn.

Calls in flight are counted in Redis, one sorted set per instance scored by each call's deadline, so a
worker that dies mid-call leaves no count behind once that deadline has passed. A service with a single
instance skips the counting: there is nothing to choose between.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from redis import Redis
from redis.client import Pipeline

from orchestrator import scripts
from orchestrator.breaker import CircuitBreaker, Permit
from orchestrator.config import Config, HttpServer, StdioServer
from orchestrator.errors import CircuitOpen, Unavailable
from orchestrator.health import Health, HealthBook
from orchestrator.registry import Registry

FRESH_FOR = 1.0  # seconds a worker trusts its view of a service's instances, unless told of a change sooner


@dataclass
class View:
    """What a worker knows of a service's instances: their servers, health and avoidances."""

    servers: dict[str, StdioServer | HttpServer]
    health: dict[str, Health]
    avoid: dict[str, float]
    at: float = field(default_factory=time.monotonic)


@dataclass
class Lease:
    """One call's hold on an instance: the breaker permit it was given and its in-flight entry."""

    service: str
    instance: str
    breaker: CircuitBreaker
    permit: Permit | None
    token: str | None
    began: float = field(default_factory=time.monotonic)


@dataclass
class Ask:
    """A breaker permit asked for ahead of a call, in a round trip the step makes anyway (a service of one
    instance: there is no choice to make first). The call's lease takes it; an untaken one goes back."""

    service: str
    instance: str
    breaker: CircuitBreaker
    permit: Permit | None = None
    taken: bool = False

    def answer(self, reply: Any) -> None:
        self.permit = CircuitBreaker.permit(reply)

    def take(self, service: str, instance: str) -> Permit | None:
        if self.taken or self.permit is None or (service, instance) != (self.service, self.instance):
            return None
        self.taken = True
        return self.permit


class Balancer:
    """Leases instances of services to calls, from one worker process."""

    def __init__(self, config: Config, redis: Redis, namespace: str) -> None:
        self.config = config
        self.redis = redis
        self.namespace = namespace
        self.health = HealthBook(redis, namespace)
        self._registry = Registry(redis, namespace)
        self._breakers: dict[tuple[str, str], CircuitBreaker] = {}
        self._views: dict[str, View] = {}
        self._registered: dict[str, HttpServer] = {}
        self._lock = threading.Lock()
        self._turn = itertools.count()

    def breaker(self, service: str, instance: str) -> CircuitBreaker:
        """The breaker every worker shares for one instance of a service."""
        key = (service, instance)
        if key not in self._breakers:
            settings = self.config.services[service].breaker
            self._breakers[key] = CircuitBreaker.of(self.redis, self.namespace, service, instance, settings)
        return self._breakers[key]

    def invalidate(self, service: str | None = None) -> None:
        """Forget the cached view of a service (of every service when None): something changed."""
        with self._lock:
            if service is None:
                self._views.clear()
            else:
                self._views.pop(service, None)

    def view(self, service: str) -> View:
        with self._lock:
            view = self._views.get(service)
        if view is not None and time.monotonic() - view.at < FRESH_FOR:
            return view
        servers: dict[str, StdioServer | HttpServer] = {
            name: self.config.server_params(name) for name in self.config.services[service].servers
        }
        registered = self._registry.registered(service)
        servers.update({name: spec for name, spec in sorted(registered.items()) if name not in servers})
        health, avoid = self.health.view(service)
        view = View(servers, health, avoid)
        with self._lock:
            self._views[service] = view
            self._registered.update(registered)
        return view

    def server(self, instance: str) -> StdioServer | HttpServer:
        """How to reach an instance: a configured server, or one registered at run time."""
        if instance in self.config.servers:
            return self.config.server_params(instance)
        with self._lock:
            if instance in self._registered:
                return self._registered[instance]
        raise Unavailable(f"instance '{instance}' is neither configured nor registered")

    def ask_ahead(self, service: str, pipe: Pipeline) -> Ask | None:
        """Queue the breaker's ask for a service of one instance on `pipe`; None when there is none to ask."""
        if service not in self.config.services:  # the lease will say so, where the step records its failure
            return None
        view = self.view(service)
        if len(view.servers) != 1:
            return None
        (instance,) = view.servers
        breaker = self.breaker(service, instance)
        if not breaker.settings.enabled:
            return None
        breaker.ask(pipe)
        return Ask(service, instance, breaker)

    def give_back(self, ask: Ask) -> None:
        """Return a permit asked ahead whose call was not made (its step was skipped, say)."""
        if not ask.taken and ask.permit is not None:
            ask.breaker.give_back(ask.permit)

    def lease(self, service: str, deadline: float, elsewhere: Collection[str] = (), ask: Ask | None = None) -> Lease:
        """An instance for one call, avoiding `elsewhere` (instances this call already failed on) if it can;
        `ask` is a permit asked ahead, used when it is for the chosen instance."""
        view = self.view(service)
        up = [name for name in view.servers if view.health.get(name) is None or view.health[name].status == "up"]
        if not up:
            raise Unavailable(f"no healthy instance of service '{service}': {_downs(view)}")
        counts = self.in_flight(service, up) if len(view.servers) > 1 else dict.fromkeys(up, 0)
        turn = next(self._turn)
        order = sorted(
            range(len(up)),
            key=lambda i: (up[i] in elsewhere or up[i] in view.avoid, counts[up[i]], (i - turn) % len(up)),
        )
        refusals: list[str] = []
        retry_at: list[float | None] = []
        for name in (up[i] for i in order):
            breaker = self.breaker(service, name)
            permit = ask.take(service, name) if ask is not None else None
            if permit is None and breaker.settings.enabled:
                permit = breaker.acquire()
            if permit is not None and not permit.allowed:
                until = time.strftime("%H:%M:%S", time.localtime(permit.retry_at)) if permit.retry_at else "trials end"
                refusals.append(f"circuit breaker for {service}/{name} is {permit.state}; refusing calls until {until}")
                retry_at.append(permit.retry_at)
                continue
            token = self._enter(service, name, deadline) if len(view.servers) > 1 else None
            return Lease(service, name, breaker, permit, token)
        # The earliest a refused call may go: a half-open breaker's trials may end any time.
        soonest = None if None in retry_at else min(t for t in retry_at if t is not None)
        raise CircuitOpen("; ".join(refusals), retry_at=soonest)

    def release(
        self, lease: Lease, failed: bool | None, pipe: Pipeline | None = None, session: str | None = None
    ) -> None:
        """End a call: record its outcome in the breaker (None: no verdict on the server; `session`: the MCP
        session whose end failed it) and drop its count, in one round trip (on `pipe`, executed by the caller,
        when given)."""
        own = pipe is None
        pipe = self.redis.pipeline(transaction=False) if pipe is None else pipe
        if lease.permit is not None and failed is not None:
            lease.breaker.record(lease.permit, failed, time.monotonic() - lease.began, pipe=pipe, session=session)
        if lease.token is not None:
            pipe.zrem(self._in_flight_key(lease.service, lease.instance), lease.token)
        if own:
            scripts.execute(pipe)

    def avoid(self, service: str, instance: str) -> None:
        """A call just failed on this instance: let the others take calls for a while."""
        if len(self.view(service).servers) > 1:
            self.health.avoid(service, instance, self.config.services[service].health.avoid_after_failure)

    def _in_flight_key(self, service: str, instance: str) -> str:
        return f"{self.namespace}:inflight:{service}:{instance}"

    def in_flight(self, service: str, instances: list[str]) -> dict[str, int]:
        """Calls in flight on each instance, across the fleet (one round trip)."""
        pipe = self.redis.pipeline(transaction=False)
        now = time.time()
        for name in instances:
            pipe.zremrangebyscore(self._in_flight_key(service, name), "-inf", now)
            pipe.zcard(self._in_flight_key(service, name))
        counts = pipe.execute()[1::2]
        return {name: int(count) for name, count in zip(instances, counts, strict=True)}

    def _enter(self, service: str, instance: str, deadline: float) -> str:
        token = uuid.uuid4().hex
        self.redis.zadd(self._in_flight_key(service, instance), {token: deadline})
        return token


def _downs(view: View) -> str:
    return "; ".join(
        f"{name} failed its health beat at {time.strftime('%H:%M:%S', time.localtime(h.at))} ({h.error or 'no answer'})"
        for name, h in view.health.items()
        if name in view.servers
    )
