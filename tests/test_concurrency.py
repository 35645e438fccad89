"""Concurrency limits per service and per tool, held across the fleet: the lease scripts on a real Redis, the
policy in a worker's pipeline, and two worker processes (one of them killed) under one limit."""

from __future__ import annotations

import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from celery.utils.nodenames import host_format
from redis import Redis

import celeryconfig
from orchestrator import ConfigError, Orchestrator, load_config
from orchestrator.compiler import step_call
from orchestrator.concurrency import Bound, ConcurrencyLimits, ServiceLimits, ToolLimits
from orchestrator.results import StepResult
from orchestrator.runs import RunStore
from orchestrator.workflow import Workflow
from workers.app import app, queue_for
from workers.execution import execute_step
from workers.pipeline import Retry
from workers.policies import CallMetrics
from workers.runtime import Runtime

from .conftest import SERVERS, PrivateRedis, WorkerProcesses, queues_of, worker_fleet

# The lease scripts, on the session's Redis (REDIS_URL, or the embedded one).


@pytest.fixture
def limits(redis_url: str) -> ConcurrencyLimits:
    settings = ServiceLimits(concurrency=2, tools={"slow": ToolLimits(concurrency=1)})
    return ConcurrencyLimits(Redis.from_url(redis_url), f"limits-{uuid.uuid4().hex[:8]}", {"svc": settings})


def held(redis_url: str, bound: Bound) -> list[str]:
    return sorted(raw.decode() for raw in Redis.from_url(redis_url).zrange(bound.key, 0, -1))


def test_a_service_without_limits_has_no_bounds(limits: ConcurrencyLimits) -> None:
    assert limits.bounds("other", "slow") == []
    assert [bound.scope for bound in limits.bounds("svc", "fast")] == ["service svc"]
    assert [bound.scope for bound in limits.bounds("svc", "slow")] == ["service svc", "tool svc.slow"]


def test_a_call_takes_every_limit_that_applies_or_none(limits: ConcurrencyLimits, redis_url: str) -> None:
    service, tool = limits.bounds("svc", "slow")
    later = time.time() + 60
    assert limits.acquire([service, tool], "a", later) is None
    refusal = limits.acquire([service, tool], "b", later + 1)
    assert refusal is not None and refusal.bound == tool
    assert refusal.soonest == pytest.approx(later)
    assert held(redis_url, service) == ["a"]  # b took no lease on the service when the tool's was full
    assert limits.acquire(limits.bounds("svc", "fast"), "c", later) is None
    refusal = limits.acquire(limits.bounds("svc", "fast"), "d", later)
    assert refusal is not None and refusal.bound == service and refusal.bound.concurrency == 2
    assert held(redis_url, service) == ["a", "c"] and held(redis_url, tool) == ["a"]


def test_a_release_frees_the_slot_on_every_limit(limits: ConcurrencyLimits, redis_url: str) -> None:
    bounds = limits.bounds("svc", "slow")
    later = time.time() + 60
    assert limits.acquire(bounds, "a", later) is None
    limits.release(bounds, "a")
    assert held(redis_url, bounds[0]) == [] and held(redis_url, bounds[1]) == []
    assert limits.acquire(bounds, "b", later) is None


def test_a_lease_ends_with_its_deadline(limits: ConcurrencyLimits, redis_url: str) -> None:
    bounds = limits.bounds("svc", "slow")
    assert limits.acquire(bounds, "dead", time.time() - 1) is None  # a worker that died holding it
    assert limits.acquire(bounds, "next", time.time() + 60) is None
    assert held(redis_url, bounds[1]) == ["next"]


def test_a_full_limit_drops_the_leases_of_workers_that_stopped_beating(
    limits: ConcurrencyLimits, redis_url: str
) -> None:
    """A dead worker's leases give way at once rather than at their deadline, which the calls waiting behind
    them share."""
    redis = Redis.from_url(redis_url)
    beats = f"beats-{uuid.uuid4().hex[:8]}"
    now_ms = time.time() * 1000
    redis.zadd(beats, {"alive": now_ms + 60_000, "dead": now_ms - 1})
    bounds = limits.bounds("svc", "fast")
    later = time.time() + 60
    try:
        assert limits.acquire(bounds, "alive|1", later, beats) is None
        assert limits.acquire(bounds, "dead|2", later, beats) is None  # it beat when it took the lease
        assert limits.acquire(bounds, "alive|3", later, beats) is None
        assert held(redis_url, bounds[0]) == ["alive|1", "alive|3"]
        assert limits.acquire(bounds, "gone|4", later, beats) is not None  # live workers' leases stay
        redis.zrem(beats, "alive")  # reaped, or shut down: no longer in the set
        assert limits.acquire(bounds, "other|5", later, beats) is None
    finally:
        redis.delete(beats)


def test_without_heartbeats_a_lease_lasts_until_its_deadline(limits: ConcurrencyLimits) -> None:
    bounds = limits.bounds("svc", "slow")
    assert limits.acquire(bounds, "gone|1", time.time() + 60, "no-such-heartbeats") is None
    assert limits.acquire(bounds, "other|2", time.time() + 60, "no-such-heartbeats") is not None


# Configuration: bad limits are refused at load time, naming file, service and field.


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"concurrency": 0}, "field 'services.svc.limits.concurrency': Input should be greater than or equal to 1"),
        ({"concurrency": -3}, "field 'services.svc.limits.concurrency': Input should be greater than or equal to 1"),
        ({"concurrency": 2.5}, "field 'services.svc.limits.concurrency': Input should be a valid integer"),
        ({"concurrency": "3"}, "field 'services.svc.limits.concurrency': Input should be a valid integer"),
        ({"concurrency": True}, "field 'services.svc.limits.concurrency': Input should be a valid integer"),
        ({"tools": {"a": {"concurrency": 0}}}, "field 'services.svc.limits.tools.a.concurrency': Input should be"),
        ({"tools": {"a": {}}}, "field 'services.svc.limits.tools.a': give `concurrency`, `rate` or both"),
        ({"tools": {"zap": {"concurrency": 1}}}, "services.svc.limits.tools: unknown tool 'zap' (the service's tools"),
        ({"burst": 5}, "field 'services.svc.limits.burst': Extra inputs are not permitted"),
        ({"tools": {"a": {"concurrency": 1, "rate": 2}}}, "field 'services.svc.limits.tools.a.rate': a rate is"),
        ({"tools": {"a": {"concurrency": 1, "limit": 2}}}, "field 'services.svc.limits.tools.a.limit': Extra inputs"),
        ({"rate": "100/x"}, "field 'services.svc.limits.rate': a rate is written COUNT/UNIT with COUNT ≥ 1 and UNIT"),
        ({"rate": "0/s"}, "field 'services.svc.limits.rate': a rate is written COUNT/UNIT"),
        ({"rate": "-5/m"}, "field 'services.svc.limits.rate': a rate is written COUNT/UNIT"),
        ({"rate": 100}, "field 'services.svc.limits.rate': a rate is written COUNT/UNIT"),
        ({"tools": {"zap": {"rate": "5/s"}}}, "services.svc.limits.tools: unknown tool 'zap' (the service's tools"),
        ({"per_caller": "10/s"}, "services.svc.limits.per_caller: needs access control"),
    ],
)  # fmt: skip
def test_bad_limits_are_refused_at_load(tmp_path: Path, limits: dict[str, Any], message: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({
        "servers": {"s": {"command": "python", "args": ["x.py"]}},
        "services": {"svc": {"server": "s", "tools": ["a", "b"], "limits": limits}},
    }))  # fmt: skip
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert message in str(caught.value)


def test_a_service_without_a_tool_list_may_limit_any_tool(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({
        "servers": {"s": {"command": "python", "args": ["x.py"]}},
        "services": {"svc": {"server": "s", "limits": {"concurrency": 4, "tools": {"any": {"concurrency": 1}}}}},
    }))  # fmt: skip
    assert load_config(path).services["svc"].limits == ServiceLimits(
        concurrency=4, tools={"any": ToolLimits(concurrency=1)}
    )


# The policy in one worker's pipeline: a refused call waits in the broker, is not an attempt, and gives back nothing.


@pytest.fixture
def runtime(tmp_path: Path, redis_url: str) -> Iterator[Runtime]:
    """A worker's runtime for a service `limited` (the test server over stdio), one call at a time across the
    fleet; its limit's lease set starts empty."""
    path = tmp_path / "limited.yaml"
    path.write_text(yaml.safe_dump({
        "servers": {"limited": {"command": "python", "args": [str(SERVERS / "testing.py")]}},
        "services": {"limited": {"server": "limited", "timeout": 20, "limits": {"concurrency": 1}}},
    }))  # fmt: skip
    current = Runtime.create(load_config(path), redis_url)
    current.store.redis.delete(lease_key())
    try:
        yield current
    finally:
        current.store.redis.delete(lease_key())
        current.close()


def lease_key() -> str:
    return f"{celeryconfig.settings.namespace}:concurrency:service:limited"


def one_step(runtime: Runtime, timeout: float = 20) -> Callable[[], Any]:
    """A run of one `echo` step on `limited`; returns how to execute its call as a worker would."""
    workflow = Workflow.model_validate(
        {"steps": [{"id": "s", "service": "limited", "tool": "echo", "timeout": timeout}]}
    )
    graph = runtime.config.graph(workflow, "w")
    run_id = uuid.uuid4().hex
    runtime.store.write(run_id, RunStore.records(graph, "v", {}))
    return lambda: execute_step(runtime, step_call(run_id, graph.steps[0]), "here")


def test_a_call_over_the_limit_waits_in_the_broker_and_is_not_an_attempt(runtime: Runtime) -> None:
    redis = runtime.store.redis
    redis.zadd(lease_key(), {"another:call": time.time() + 60})
    outcome = one_step(runtime)()
    assert isinstance(outcome, Retry), outcome
    assert outcome.call.attempt == 0 and outcome.call.attempt_errors == []
    assert 0 < outcome.countdown <= 1.0
    assert [raw.decode() for raw in redis.zrange(lease_key(), 0, -1)] == ["another:call"]  # released nothing
    metrics = runtime.pipeline.find(CallMetrics)
    assert metrics is not None
    assert {labels: count for labels, (count, _) in metrics.snapshot().items()} == {
        ("limited", "echo", "limited", "Throttled"): 1  # placed on its instance, then refused there
    }
    redis.zrem(lease_key(), "another:call")
    again = execute_step(runtime, outcome.call, "here")
    assert isinstance(again, StepResult) and again.status == "succeeded", again
    assert again.attempts == 1
    assert redis.zcard(lease_key()) == 0  # the call's lease went back after its attempt


def test_a_call_still_over_the_limit_at_its_deadline_fails_saying_so(runtime: Runtime) -> None:
    runtime.pool.ready("limited", 30)  # the session is open: the call's time goes to waiting for the limit
    runtime.store.redis.zadd(lease_key(), {"another:call": time.time() + 60})
    outcome = one_step(runtime, timeout=0.1)()  # shorter than any wait for a slot
    assert isinstance(outcome, StepResult) and outcome.status == "failed", outcome
    assert outcome.error == "concurrency limit of 1 reached for service limited"
    assert outcome.error_type == "Throttled"


# The acceptance test: two worker processes, a limit of 3 on a service whose tool sleeps 300 ms, 30 calls at once.

HEARTBEAT = "0.5"  # seconds: a killed worker's messages are back on their queue within about 1.5 s


@pytest.fixture
def fleet(
    worker_env: dict[str, str], redis_url: str, tmp_path: Path, http_server: Callable[..., str]
) -> Iterator[tuple[Orchestrator, WorkerProcesses, Redis]]:
    """Two workers for `limited`, limited to 3 calls at once, on a Redis of this test's own. Both reach one test
    server over HTTP, which counts the calls it is running at once, whichever worker sent them."""
    url = http_server(str(SERVERS / "testing.py"))
    config = tmp_path / "limited.yaml"
    config.write_text(yaml.safe_dump({
        "servers": {"limited": {"url": url}},
        "services": {"limited": {"server": "limited", "timeout": 120, "limits": {"concurrency": 3}}},
    }))  # fmt: skip
    private = PrivateRedis(tmp_path / "redis").start()
    env = {**worker_env, "MCPO_HEARTBEAT_INTERVAL": HEARTBEAT}
    env.pop("MCPO_VISIBILITY_TIMEOUT", None)
    try:
        with worker_fleet(private.url, env, tmp_path, redis_url, config=config, service="limited") as (orch, workers):
            yield orch, workers, Redis.from_url(private.url)
    finally:
        private.stop(signal.SIGKILL)


def fan_out(calls: int, seconds: float = 0.3) -> Workflow:
    return Workflow.model_validate({"id": "wide", "steps": [
        {"id": f"c{i}", "service": "limited", "tool": "concurrent", "parameters": {"seconds": seconds},
         "depends_on": []}
        for i in range(calls)
    ]})  # fmt: skip


def most_at_once(steps: dict[str, StepResult]) -> int:
    """The most calls the server ran at once: each answer says the most it had seen by then."""
    return max(int(step.output["max_in_flight"]) for step in steps.values())


def test_the_limit_holds_across_two_worker_processes(fleet: tuple[Orchestrator, WorkerProcesses, Redis]) -> None:
    orchestrator, _, redis = fleet
    result = orchestrator.enqueue(fan_out(30)).wait(timeout=120)
    assert result.status == "succeeded", result.errors
    assert [step.status for step in result.steps.values()] == ["succeeded"] * 30
    assert most_at_once(result.steps) <= 3
    assert redis.zcard(lease_key()) == 0  # every lease went back


def test_a_killed_workers_leases_do_not_stop_the_run(fleet: tuple[Orchestrator, WorkerProcesses, Redis]) -> None:
    orchestrator, workers, redis = fleet
    run = orchestrator.enqueue(fan_out(30, seconds=2.0))  # calls long enough to outlast the set-up of the kill
    kill_a_lease_holder(workers, redis)
    result = run.wait(timeout=180)
    assert result.status == "succeeded", result.errors
    assert [step.status for step in result.steps.values()] == ["succeeded"] * 30
    assert most_at_once(result.steps) <= 3
    assert redis.zcard(lease_key()) == 0


def kill_a_lease_holder(workers: WorkerProcesses, redis: Redis) -> None:
    """SIGKILL a worker process while a call of its holds a lease on the limit, within 60 s.

    The worker stops taking messages first (Celery's `cancel_consumer`, then kombu's last BRPOP of the queue
    ends within its 1 s timeout), and goes on running the calls it holds: killed just as Redis hands it a
    message, it would lose that message (kombu pops it off the queue before keeping it as reserved), which is the
    broker's matter, not this test's. A worker that has no lease by then takes messages again, and another is
    tried."""
    queue = queue_for("limited")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for victim in holding_a_lease(workers, redis)[:1]:
            name = host_format(f"limited-{victim.pid}@%h")
            app.control.cancel_consumer(queue, destination=[name], reply=True, timeout=5)
            while queue in queues_of(name) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(1.5)
            if victim in holding_a_lease(workers, redis):
                victim.kill()
                victim.wait(10)
                return
            app.control.add_consumer(queue, destination=[name], reply=True, timeout=5)
        time.sleep(0.01)
    raise AssertionError("no worker could be killed holding a lease within 60 s")


def holding_a_lease(workers: WorkerProcesses, redis: Redis) -> list[subprocess.Popen[bytes]]:
    """The live worker processes with a call that holds a lease on the limit: a holder is named
    `<worker>|<attempt>`, a worker `<host>:<pid>:<nonce>` (workers/reclaim.py)."""
    pids = {int(holder.decode().split("|")[0].split(":")[1]) for holder in redis.zrange(lease_key(), 0, -1)}
    return [process for process in workers.processes if process.pid in pids and process.poll() is None]
