"""The Python API: `Orchestrator` enqueues workflows and reads runs; `Run` waits for one."""

from __future__ import annotations

import functools
import json
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from orchestrator.backend import Backend
from orchestrator.batching import Batching, workers_serving
from orchestrator.compiler import compile_run
from orchestrator.config import Config, load_config, load_workflow
from orchestrator.errors import (
    ConfigError,
    NotResumable,
    RedisUnreachable,
    RunNotFound,
    RunTimeout,
    WorkflowNotFound,
)
from orchestrator.fleet import Fleet
from orchestrator.history.events import REDACTED, record_operation
from orchestrator.history.records import RecordStore
from orchestrator.idempotency import Claim, EnqueueKeys, check_key, request_digest
from orchestrator.registry import Registry
from orchestrator.results import RunResult, StepResult
from orchestrator.runs import RunStore
from orchestrator.security.access import AccessControl, enabled
from orchestrator.security.identity import Identity, IdentitySettings, SigningKey, mint_caller
from orchestrator.security.sealing import hide_run, holds_sealed, open_params, open_run
from orchestrator.settings import settings
from orchestrator.workflow import Graph, Workflow
from workers.app import queue_for
from workers.outage import ride_out
from workers.tls import tls_refused

CALLER_GRACE = 600.0  # seconds a run's step messages may wait in queues beyond the steps' own budgets


def _moved(name: str) -> Any:
    def moved(self: Orchestrator, *args: Any, **kwargs: Any) -> Any:
        warning = f"Orchestrator.{name}() is now Orchestrator.fleet.{name}(); the old name goes in the next release"
        warnings.warn(warning, DeprecationWarning, stacklevel=2)
        return getattr(self.fleet, name)(*args, **kwargs)

    moved.__name__ = name
    moved.__doc__ = f"Deprecated: use `fleet.{name}`."
    return moved


class Run:
    """A handle on one enqueued run."""

    def __init__(self, orchestrator: Orchestrator, run_id: str) -> None:
        self.id = run_id
        self._orchestrator = orchestrator

    def status(self, reveal: bool = True) -> RunResult:
        """The run so far; `reveal=False` shows sealed (sensitive) values as `[sealed]` instead of opening them."""
        # The handle of a run is its starter's: it reads the run without a `read` permission of its own.
        store = self._orchestrator.connect()
        result = ride_out(lambda: store.load(self.id))
        return open_run(result) if reveal else hide_run(result)

    def wait(self, timeout: float | None = None, poll: float = 0.05) -> RunResult:
        """Block until the run ends; raises RunTimeout after `timeout` seconds."""
        store = self._orchestrator.connect()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not store.is_terminal(ride_out(lambda: store.status(self.id))):
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
        self.config = config
        self._token = token if token is not None else IdentitySettings().token
        self._access: AccessControl | None = None
        self._backend = Backend(config, redis_url, broker_url)
        self._records: RecordStore | None = None
        self.fleet = Fleet(self)  # services, their instances and health: `orch.fleet.register(...)`

    @classmethod
    def from_file(cls, path: str | Path, **options: Any) -> Orchestrator:
        return cls(load_config(path), **options)

    @property
    def embedded(self) -> bool:
        return self._backend.embedded is not None

    @property
    def store(self) -> RunStore:
        """Deprecated: `connect()` (a property should not start servers and threads)."""
        warnings.warn("Orchestrator.store is deprecated: use Orchestrator.connect()", DeprecationWarning, stacklevel=2)
        return self.connect()

    def connect(self) -> RunStore:
        """Connect to Redis (starting the embedded one on the embedded default), the broker and the records
        flusher, once; every method that needs them does this first."""
        return self._backend.connect()

    def enqueue(self, workflow: str | Path | Workflow, params: dict[str, Any] | None = None, *,
                caller: str | None = None, idempotency_key: str | None = None) -> Run:  # fmt: skip
        """Start a workflow (a name in the configuration, a workflow file, or a Workflow); `caller` is who the
        records say asked for it when access control is off (default: this process's user).

        `idempotency_key`: a request with a key this caller used in the last 24 h returns the run that request
        started instead of starting another (the same key with another workflow or params is refused)."""
        return self._enqueue(workflow, params, "enqueue", caller, idempotency_key)

    def start(self, workflow: str | Path | Workflow, params: dict[str, Any] | None = None, *,
              idempotency_key: str | None = None) -> Run:  # fmt: skip
        """Start a workflow as `run` does (the `run` permission), returning its handle at once."""
        return self._enqueue(workflow, params, "run", None, idempotency_key)

    def run(self, workflow: str | Path | Workflow, params: dict[str, Any] | None = None,
            timeout: float | None = None, *, idempotency_key: str | None = None) -> RunResult:  # fmt: skip
        """Start and wait: the result of the finished run."""
        return self.start(workflow, params, idempotency_key=idempotency_key).wait(timeout)

    def _enqueue(self, workflow: str | Path | Workflow, params: dict[str, Any] | None, action: str,
                 who: str | None = None, idempotency_key: str | None = None) -> Run:  # fmt: skip
        key = check_key(idempotency_key) if idempotency_key is not None else None
        name, definition = self._resolve(workflow)
        launch = Launch(
            name, definition, {**definition.params, **(params or {})}, key, source=self._source(workflow, name)
        )
        return self._launch(launch, action, who)

    def _launch(self, launch: Launch, action: str, who: str | None = None) -> Run:
        """Check and start one run; with an idempotency key already claimed, the run that claimed it instead."""
        name, definition, params = launch.name, launch.definition, launch.params
        caller = self._allow(action, f"workflow:{name}")
        if caller is not None and definition.fallback:
            self._allow(action, f"workflow:{definition.fallback}")
        graph = self._checked(definition, name, launch.source)
        store = self.connect()
        Registry(store.redis, store.namespace).check(graph, self.config.source)
        steps = [s for s in graph.steps if launch.only is None or s.id in launch.only]
        self._ensure_workers({s.service for s in steps} | {s.fallback.service for s in steps if s.fallback})
        run_id = uuid.uuid4().hex
        who = caller.subject if caller is not None else who
        claim = Claim(run_id, name, request_digest(definition.version(), params))
        if launch.key is not None:  # claimed last, once every check has passed: a refused request claims nothing
            earlier = self._claim(launch.key, claim, who)
            if earlier is not None:
                return Run(self, earlier)
        try:
            sign = self._caller_tokens(caller, action)
            fallback = (
                self._fallback_run(definition.fallback, run_id, params, sign, graph.sensitive)
                if definition.fallback
                else None
            )
            records = store.records(graph, definition.version(), params, fallback, who=who, origin=launch.origin(),
                                    reused=launch.reused)  # fmt: skip
            store.write(run_id, records)
            compile_run(
                run_id, graph, caller=sign(run_id, name, graph), only=launch.only, batching=self._batching()
            ).apply_async()
        except BaseException:
            if launch.key is not None:  # the run did not start: a retry with the key may start it
                EnqueueKeys(store.redis, store.namespace).release(launch.key, who, claim)
            raise
        return Run(self, run_id)

    def _claim(self, key: str, claim: Claim, who: str | None) -> str | None:
        """The run an earlier request with the key started, or None once `claim` holds the key."""
        store = self.connect()
        earlier = EnqueueKeys(store.redis, store.namespace).claim(key, who, claim, store.exists)
        if earlier is not None and store.record:
            record_operation(store.redis, store.namespace, "enqueue-repeated", who, run_id=earlier,
                             outcome="existing run", detail={"idempotency_key": key})  # fmt: skip
        return earlier

    def resume(self, run_id: str, from_step: str | None = None) -> Run:
        """Start a new run of an ended run's workflow (its definition as it ran, its params) that takes over the
        outputs of the steps that succeeded and runs the others again, or, `from_step`, that step and every step
        after it too (each step that depends on one run again runs again). Needs `read` and `enqueue` on the
        workflow; the records link the runs (`resumed_from`, and each reused step's `reused_from`)."""
        original, definition = self._stored_run(run_id)
        for action in ("read", "enqueue"):  # both before the run's state is told
            self._allow(action, f"workflow:{original.workflow}")
        if not original.done:
            raise NotResumable(f"run {run_id} is still {original.status}: resume it once it has ended (or cancel it)")
        if definition is None:
            raise NotResumable(f"run {run_id} was started before runs kept their workflow definition: start it anew")
        workflow = Workflow.model_validate(definition)
        graph = self.config.graph(workflow, original.workflow)
        again = _again(graph, original, from_step)
        reused = {
            step_id: step.model_copy(update={"reused_from": run_id})
            for step_id, step in original.steps.items()
            if step_id in graph.index and step_id not in again
        }
        launch = Launch(original.workflow, workflow, _params_of(original), None, run_id, reused, again)
        return self._launch(launch, "enqueue")

    def _stored_run(self, run_id: str) -> tuple[RunResult, dict[str, Any] | None]:
        """A run as stored (sealed values sealed) and its workflow definition: from Redis, else from the records."""
        try:
            store = self.connect()
            return store.load(run_id), store.definition(run_id)
        except RunNotFound:
            if not settings.records:
                raise
            return self.records.load(run_id), self.records.definition(run_id)

    def cancel(self, run_id: str) -> RunResult:
        """Cancel a run: no further step starts, in-flight calls are cancelled; what finished is kept."""
        store = self.connect()
        self._allow("cancel", lambda: f"workflow:{store.load(run_id).workflow}")
        store.cancel(run_id)
        return self.status(run_id)

    # The fleet's administration moved to `fleet`; the old names work for one more release.
    discover = _moved("discover")
    services = _moved("services")
    health_history = _moved("health_history")
    register = _moved("register")
    deregister = _moved("deregister")

    def status(self, run_id: str, reveal: bool = True) -> RunResult:
        """A run's result so far, by id, from any process; from the SQL records once Redis forgot it.
        `reveal=False`: sealed (sensitive) values shown as `[sealed]` rather than opened; opening them needs the
        `reveal` permission on the run's workflow besides `read`."""
        access = self.access_control()
        caller = access.authenticate(self._token) if access is not None else None  # before saying a run exists
        try:
            result = self.connect().load(run_id)
        except RunNotFound:
            if not settings.records:
                raise
            result = self.records.load(run_id)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            result = self._recorded(run_id, exc)
        if access is not None and caller is not None:
            access.policy.check(caller, "read", f"workflow:{result.workflow}")
            if reveal and holds_sealed(result):
                access.policy.check(caller, "reveal", f"workflow:{result.workflow}")
        return open_run(result) if reveal else hide_run(result)

    def _recorded(self, run_id: str, exc: Exception) -> RunResult:
        """A run from the SQL records while Redis is unreachable: what was written there, which may lag."""
        address = self._backend.address
        if tls_refused(exc):  # the records would hide a certificate this client does not trust
            raise RedisUnreachable(address, f": {exc}") from exc
        if not settings.records:
            raise RedisUnreachable(address) from exc
        try:
            return self.records.load(run_id)
        except RunNotFound:
            raise RedisUnreachable(address, f", and the records hold no run {run_id}") from exc

    def access_control(self) -> AccessControl | None:
        """The configuration's access control (connecting, on first use); None when it is off (no `access:`)."""
        if self._access is None and enabled(self.config.access):
            store = self.connect()
            self._access = AccessControl(self.config.access, store.redis, store.namespace)  # type: ignore[arg-type]
        return self._access

    def _allow(self, action: str, resource: str | Callable[[], str]) -> Identity | None:
        """The caller, once their token grants action on resource; None when access control is off."""
        access = self.access_control()
        return None if access is None else access.require(self._token, action, resource)

    def _caller_tokens(self, caller: Identity | None, action: str) -> Callable[[str, str, Graph], str | None]:
        """Mints each run's caller token, valid for the run's whole budget; no tokens when access is off."""
        if caller is None:
            return lambda run_id, workflow, graph: None
        key = SigningKey.from_environment().load()

        def sign(run_id: str, workflow: str, graph: Graph) -> str | None:
            return mint_caller(key, caller, run_id, workflow, action, self._budget(graph))

        return sign

    def graph(self, workflow: str | Path | Workflow) -> Graph:
        """Check a workflow against the configuration without running it: what `enqueue` checks."""
        name, definition = self._resolve(workflow)
        return self._checked(definition, name, self._source(workflow, name))

    def _checked(self, definition: Workflow, name: str, source: str | None) -> Graph:
        graph = self.config.graph(definition, name, source)
        self._check_timeouts(graph, source or self.config.source)
        return graph

    def _source(self, workflow: str | Path | Workflow, name: str) -> str | None:
        """The workflow file a workflow came from; None for one of the configuration's or a Workflow object."""
        if isinstance(workflow, Workflow) or (isinstance(workflow, str) and workflow in self.config.workflows):
            return None
        return str(workflow)

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
        canvas = compile_run(
            child_id, graph, after_fallback=run_id, caller=sign(child_id, name, graph), batching=self._batching()
        )
        return {"run_id": child_id, "records": records, "canvas": dict(canvas)}

    def _batching(self) -> Batching:
        """Which parallel calls go in batch messages: the fleet's heartbeats are asked once per service."""
        store = self.connect()
        return Batching.of(self.config, functools.cache(
            lambda service: workers_serving(store.redis, store.namespace, queue_for(service))))  # fmt: skip

    def _budget(self, graph: Graph) -> float:
        """A bound on how long a run's messages live: every step's and fallback's time budget, one after another,
        and time for them to wait in queues (a caller token must outlive its run, and not much more)."""
        total = sum(step.timeout + (step.fallback.timeout if step.fallback else 0.0) for step in graph.steps)
        return total + CALLER_GRACE

    def _check_timeouts(self, graph: Graph, source: str | None) -> None:
        limit = settings.visibility_timeout
        for step in graph.steps:
            if step.timeout >= limit:
                raise ConfigError(
                    f"{step.where}, field 'timeout': {step.timeout:g} s reaches the broker's "
                    f"visibility timeout ({limit} s, MCPO_VISIBILITY_TIMEOUT); a redelivered call would run twice",
                    source=source,
                )

    def _ensure_workers(self, services: set[str]) -> None:
        self._backend.ensure_workers(services)

    def close(self) -> None:
        """Stop in-process workers and MCP sessions, and the embedded Redis if this process started it."""
        if self._records is not None:
            self._records.close()
        self._backend.close()

    @property
    def records(self) -> RecordStore:
        """The SQL records (DATABASE_URL, else SQLite under MCPO_HOME): run history and the audit chain."""
        if self._records is None:
            self._records = RecordStore(settings.records_url)
        return self._records

    def __enter__(self) -> Orchestrator:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


@dataclass(frozen=True)
class Launch:
    """What starts one run: the workflow, its params, and for a resume the run it resumes, the step records it
    takes over and the steps it runs (all when None)."""

    name: str
    definition: Workflow
    params: dict[str, Any]
    key: str | None = None  # the caller's idempotency key
    resumed_from: str | None = None
    reused: dict[str, StepResult] = field(default_factory=dict)
    only: set[str] | None = None
    source: str | None = None  # the workflow file it came from, named in errors

    def origin(self) -> dict[str, str]:
        """The run's fields that say where it came from: its definition (what a resume rebuilds it from), the run
        it resumes and its idempotency key."""
        fields = {"definition": json.dumps(self.definition.model_dump(mode="json", by_alias=True, exclude_unset=True))}
        if self.resumed_from:
            fields["resumed_from"] = self.resumed_from
        if self.key:
            fields["idempotency_key"] = self.key
        return fields


def _again(graph: Graph, run: RunResult, from_step: str | None) -> set[str]:
    """The steps a resume of run runs again: each that did not succeed (and `from_step`), and every step after one."""
    if from_step is not None and from_step not in graph.index:
        known = ", ".join(graph.index)
        raise NotResumable(f"run {run.id}: workflow '{run.workflow}' has no step '{from_step}' (steps: {known})")
    start = {s.id for s in graph.steps if run.steps.get(s.id) is None or run.steps[s.id].status != "succeeded"}
    start |= {from_step} if from_step else set()
    again = {s.id for s in graph.steps if s.id in start or graph.ancestors(s.id) & start}
    if not again:
        raise NotResumable(f"run {run.id} {run.status} in every step: name a step to run again from (--from STEP)")
    return again


def _params_of(run: RunResult) -> dict[str, Any]:
    """A run's params to run it again with (sealed ones opened: the new run seals them again)."""
    params = open_params(run.params)
    lost = sorted(key for key, value in params.items() if value == REDACTED)
    if lost:
        raise NotResumable(
            f"run {run.id}: Redis no longer holds it and the records redacted its param(s) {', '.join(lost)}"
        )
    return params


__all__ = ["Orchestrator", "Run", "WorkflowNotFound"]
