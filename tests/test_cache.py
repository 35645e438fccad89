"""The response cache: a read-only tool's answer served again with no MCP traffic, keys that change with everything
that decides the answer, a bound in bytes, and single-flight across worker processes — on a real Redis and real MCP
servers."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from redis import Redis
from sqlalchemy import select

from orchestrator import ConfigError, Workflow, load_config
from orchestrator.compiler import step_call
from orchestrator.history.flusher import Flusher
from orchestrator.history.records import RecordStore
from orchestrator.history.tables import AuditRecord
from orchestrator.messages import StepCall
from orchestrator.responses import ResponseCache
from orchestrator.results import StepResult
from orchestrator.runs import RunStore
from orchestrator.security.vault import KeyRing, Vault
from orchestrator.settings import settings
from workers.app import queue_for
from workers.credentials import Credentials
from workers.execution import execute_step
from workers.policies import Caching
from workers.runtime import Runtime

from .conftest import SERVERS, worker_fleet


def configuration(path: Path, cache: dict[str, Any] | None = None, env: dict[str, Any] | None = None) -> Path:
    server = {"command": "python", "args": [str(SERVERS / "testing.py")], **({"env": env} if env else {})}
    service = {"server": "cached", "retries": 0, **({"cache": cache} if cache else {})}
    path.write_text(yaml.safe_dump({"servers": {"cached": server}, "services": {"cached": service}}))
    return path


def calls(ledger: Path) -> list[str]:
    return ledger.read_text().split() if ledger.exists() else []


class Steps:
    """Steps of one-step runs made in this process, as a worker makes them (its runtime, its pipeline)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def call(self, tool: str, parameters: dict[str, Any], **options: Any) -> StepCall:
        config = self.runtime.config
        step = {"id": "s", "service": "cached", "tool": tool, "parameters": parameters, "depends_on": [], **options}
        graph = config.graph(Workflow.model_validate({"steps": [step]}), "w")
        run_id = uuid.uuid4().hex
        self.runtime.store.write(run_id, RunStore.records(graph, "v", {}))
        return step_call(run_id, graph.steps[0])

    def run(self, tool: str, parameters: dict[str, Any], **options: Any) -> StepResult:
        call = self.call(tool, parameters, **options)
        outcome = execute_step(self.runtime, call, "here")
        assert isinstance(outcome, StepResult), outcome
        self.last_run = call.run_id
        return outcome

    def audited(self, run_id: str) -> list[tuple[str, str | None, str]]:
        """The audit rows of a run's calls, once the records have every event: (action, instance, outcome)."""
        store = RecordStore(settings.records_url)
        Flusher(self.runtime.store.redis, self.runtime.store.namespace, store).flush(60)
        with store.session() as session:
            rows = session.scalars(select(AuditRecord).where(AuditRecord.run_id == run_id).order_by(AuditRecord.seq))
            return [(row.action, row.instance, row.outcome) for row in rows if row.action == "call"]


@pytest.fixture
def steps(redis_url: str, tmp_path: Path) -> Iterator[Steps]:
    runtime = Runtime.create(load_config(configuration(tmp_path / "cached.yaml", {"ttl": 60})), redis_url)
    runtime.check("cached")  # discovery: which tools say they are read-only
    try:
        yield Steps(runtime)
    finally:
        ResponseCache(runtime.store.redis, runtime.store.namespace).clear("cached")
        runtime.close()


def test_a_read_only_tools_answer_is_served_again_without_a_call(steps: Steps, tmp_path: Path) -> None:
    ledger = str(tmp_path / "ledger")
    first = steps.run("lookup", {"path": ledger, "key": "a"})
    again = steps.run("lookup", {"path": ledger, "key": "a"})
    other = steps.run("lookup", {"path": ledger, "key": "b"})
    assert (first.status, again.status, other.status) == ("succeeded", "cached", "succeeded")
    assert again.output == first.output and again.attempts == 0 and again.instance is None
    assert again.stale_age_s is not None and 0 <= again.stale_age_s < 30
    assert calls(tmp_path / "ledger") == ["a", "b"]  # the cached answer made no MCP traffic
    assert steps.audited(steps.last_run) == [("call", "cached", "succeeded")]
    steps.run("lookup", {"path": ledger, "key": "a"})
    assert steps.audited(steps.last_run) == [("call", None, "cached")]  # the audit says where the answer came from


def test_only_read_only_tools_unless_a_step_says_otherwise(steps: Steps, tmp_path: Path) -> None:
    ledger = str(tmp_path / "ledger")
    for _ in range(2):
        assert steps.run("tally", {"path": ledger, "tag": "plain"}).status == "succeeded"  # not read-only
        steps.run("tally", {"path": ledger, "tag": "opted-in"}, cache={"ttl": 30})
        steps.run("lookup", {"path": ledger, "key": "opted-out"}, cache=False)
    assert sorted(calls(tmp_path / "ledger")) == ["opted-in", "opted-out", "opted-out", "plain", "plain"]


def test_errors_sensitive_steps_and_fallbacks_are_never_cached(steps: Steps) -> None:
    failed = steps.run("fail", {}, cache=True)
    assert failed.status == "failed"
    cache = ResponseCache(steps.runtime.store.redis, steps.runtime.store.namespace)
    assert list(steps.runtime.store.redis.scan_iter(f"{cache.prefix}:entry:cached:fail:*")) == []
    policy = steps.runtime.pipeline.find(Caching)
    assert policy is not None
    call = steps.call("lookup", {"path": "x", "key": "k"})
    assert policy._ttl(call) == 60
    assert policy._ttl(replace(call, sensitive=True)) is None  # never kept: not even sealed
    assert policy._ttl(replace(call, fallback_for={"service": "x", "tool": "y", "arguments": {}})) is None


def test_clearing_drops_the_answers_of_a_service_or_a_tool(steps: Steps, tmp_path: Path) -> None:
    ledger = str(tmp_path / "ledger")
    steps.run("lookup", {"path": ledger, "key": "a"})
    steps.run("tally", {"path": ledger, "tag": "t"}, cache=True)
    cache = ResponseCache(steps.runtime.store.redis, steps.runtime.store.namespace)
    assert cache.clear("cached", "lookup") == 1
    assert steps.run("tally", {"path": ledger, "tag": "t"}, cache=True).status == "cached"
    assert steps.run("lookup", {"path": ledger, "key": "a"}).status == "succeeded"
    assert cache.clear("cached") == 2


def test_a_service_keeps_answers_within_its_bound_least_recently_used_first(redis_url: str) -> None:
    cache = ResponseCache(Redis.from_url(redis_url), f"bound-{uuid.uuid4().hex[:8]}")
    keys = [cache.key("svc", "tool", str(i)) for i in range(11)]
    answer, bound = "x" * 300, 3400  # about 330 bytes kept each: ten fit
    for key in keys[:10]:
        assert cache.put("svc", key, answer, 60, bound)
    assert cache.get("svc", keys[0]) is not None  # used: the least recently used is now keys[1]
    cache.put("svc", keys[10], answer, 60, bound)
    assert [cache.get("svc", key) is not None for key in keys] == [True, False] + [True] * 9
    assert not cache.put("svc", cache.key("svc", "tool", "big"), "x" * 400, 60, bound)  # over a tenth of the bound


def test_calls_waiting_on_a_killed_workers_call_stop_waiting(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    cache = ResponseCache(redis, f"flights-{uuid.uuid4().hex[:8]}")
    beats = f"{cache.prefix}:workers"
    key = cache.key("svc", "tool", "x")
    assert not cache.leader_alive(key, beats)  # nobody is fetching it
    assert cache.lead(key, 60, "worker-a") and not cache.lead(key, 60, "worker-b")
    assert cache.leader_alive(key, beats)  # no worker beats here: only the lock's end tells
    redis.zadd(beats, {"worker-a": (time.time() + 6) * 1000, "worker-b": (time.time() + 6) * 1000})
    assert cache.leader_alive(key, beats)
    redis.zadd(beats, {"worker-a": (time.time() - 1) * 1000})  # worker-a missed its beats: killed
    assert not cache.leader_alive(key, beats)
    redis.delete(beats)


def test_a_rotated_secret_or_a_changed_tool_keys_the_answer_afresh(redis_url: str, tmp_path: Path) -> None:
    config = load_config(configuration(tmp_path / "c.yaml", {"ttl": 60}, env={"TOKEN": {"secret": "lookup-key"}}))
    redis = Redis.from_url(redis_url)
    ring = KeyRing(path=tmp_path / "vault.keys")
    ring.ensure()
    vault = Vault(redis, settings.namespace, ring)
    vault.set("lookup-key", "first")
    cache = ResponseCache(redis, settings.namespace)
    from orchestrator.registry import Registry

    registry = Registry(redis, f"keys-{uuid.uuid4().hex[:8]}")
    policy = Caching(cache, config, registry, Credentials(vault, fresh_for=0), None)
    call = StepCall(run_id="r", step_id="s", service="cached", tool="lookup", arguments={}, timeout=5, retries=0)
    before = policy._key(call, {"key": "a"})
    assert policy._key(call, {"key": "a"}) == before and policy._key(call, {"key": "b"}) != before
    vault.set("lookup-key", "second")
    rotated = policy._key(call, {"key": "a"})
    assert rotated != before  # the server is called with another credential now
    registry.save("cached", "cached", [{"name": "lookup", "description": "changed", "input_schema": {}}])
    policy._tools.clear()
    assert policy._key(call, {"key": "a"}) not in (before, rotated)  # the tool's definition changed
    vault.remove("lookup-key")


def test_identical_calls_in_flight_at_once_make_one_call(steps: Steps, tmp_path: Path) -> None:
    ledger = str(tmp_path / "ledger")
    messages = [steps.call("lookup", {"path": ledger, "key": "same", "seconds": 0.5}) for _ in range(20)]
    outcomes: list[Any] = [None] * len(messages)

    def run(i: int) -> None:
        outcomes[i] = execute_step(steps.runtime, messages[i], "here")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(messages))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    statuses = sorted(outcome.status for outcome in outcomes)
    assert statuses == ["cached"] * 19 + ["succeeded"], statuses
    assert calls(tmp_path / "ledger") == ["same"]


def test_bad_cache_settings_are_refused_at_load(tmp_path: Path) -> None:
    for cache, message in [
        ({"ttl": 0}, "field 'services.cached.cache.ttl': Input should be greater than 0"),
        ({"ttl": 5, "tools": ["zap"]}, "services.cached.cache.tools: unknown tool 'zap'"),
        ({"tools": ["lookup"]}, "field 'services.cached.cache.ttl': Field required"),
        ({"ttl": 5, "max_bytes": 10}, "field 'services.cached.cache.max_bytes': Input should be"),
    ]:
        path = configuration(tmp_path / "bad.yaml", cache)
        data = yaml.safe_load(path.read_text())
        data["services"]["cached"]["tools"] = ["lookup", "tally"]
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(ConfigError) as caught:
            load_config(path)
        assert str(caught.value).startswith(f"{path}: ") and message in str(caught.value), str(caught.value)
    config = load_config(configuration(tmp_path / "none.yaml"))
    workflow = Workflow.model_validate({"steps": [{"id": "s", "service": "cached", "tool": "lookup", "cache": True}]})
    with pytest.raises(ConfigError, match=r"step 's'.*field 'cache': service 'cached' has no `cache:`"):
        config.graph(workflow, "w")


# Across worker processes: 50 identical calls fanned out over two workers reach the server once.


def same_lookups(ledger: Path, count: int, seconds: float) -> Workflow:
    """A fan-out of `count` identical lookups, each taking `seconds` at the server."""
    parameters = {"path": str(ledger), "key": "same", "seconds": seconds}
    return Workflow.model_validate({"id": "same", "steps": [
        {"id": f"s{i}", "service": "cached", "tool": "lookup", "parameters": parameters, "depends_on": []}
        for i in range(count)
    ]})  # fmt: skip


def test_single_flight_across_two_worker_processes(worker_env: dict[str, str], redis_url: str,
                                                   tmp_path: Path) -> None:  # fmt: skip
    config = configuration(tmp_path / "cached.yaml", {"ttl": 60, "tools": ["lookup"]})
    ledger = tmp_path / "ledger"
    workflow = same_lookups(ledger, 50, seconds=1.0)
    with worker_fleet(redis_url, worker_env, tmp_path, redis_url, config=config, service="cached") as (orch, _):
        try:
            result = orch.enqueue(workflow).wait(timeout=120)
        finally:
            orch.fleet.clear_cache("cached")
    assert result.status == "succeeded", result.errors
    assert sorted(step.status for step in result.steps.values()) == ["cached"] * 49 + ["succeeded"]
    assert calls(ledger) == ["same"]


def test_calls_waiting_on_a_worker_killed_mid_call_go_on_their_own(worker_env: dict[str, str], redis_url: str,
                                                                    tmp_path: Path) -> None:  # fmt: skip
    config = configuration(tmp_path / "cached.yaml", {"ttl": 60, "tools": ["lookup"]})
    data = yaml.safe_load(config.read_text())
    data["services"]["cached"]["timeout"] = 60  # waiting out the killed call's lock would outlast the wait below
    config.write_text(yaml.safe_dump(data))
    ledger = tmp_path / "ledger"
    workflow = same_lookups(ledger, 10, seconds=3)
    env = {**worker_env, "MCPO_HEARTBEAT_INTERVAL": "0.5"}
    with worker_fleet(redis_url, env, tmp_path, redis_url, config=config, service="cached") as (orch, workers):
        redis = orch.connect().redis
        run = orch.enqueue(workflow)
        try:
            holder = _flight_holder(redis, orch.connect().namespace)
            pid = int(holder.split(":")[1])  # a worker is named <host>:<pid>:<nonce> (workers/reclaim.py)
            _held(redis, queue_for("cached"), 10)
            victim = next(process for process in workers.processes if process.pid == pid)
            victim.kill()
            victim.wait(10)
            result = run.wait(timeout=40)
        finally:
            orch.fleet.clear_cache("cached")
    assert result.status == "succeeded", result.errors
    assert {step.status for step in result.steps.values()} <= {"succeeded", "cached"}
    assert "same" in calls(ledger)


def _held(redis: Redis, queue: str, count: int, timeout: float = 30) -> None:
    """Wait until workers hold `count` messages of queue as reserved. Killed between popping a message off the
    queue and keeping it as reserved, a worker loses it (kombu's window, the broker's matter, not this test's)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(json.loads(entry)[2] == queue for entry in redis.hvals("unacked")) >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"workers did not reserve {count} messages of {queue} within {timeout} s")


def _flight_holder(redis: Redis, namespace: str, timeout: float = 30) -> str:
    """The worker holding the flight lock of the one answer being fetched, once a call holds it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for key in redis.scan_iter(f"{namespace}:responses:entry:cached:lookup:*:flight"):
            holder = redis.get(key)
            if holder and holder != b"-":
                return holder.decode()
        time.sleep(0.05)
    raise AssertionError("no call took the flight lock")
