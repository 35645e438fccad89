"""The circuit breaker's cost: calls/s of 500 parallel `noop` steps with the breaker on and off, and the
latency of one `acquire()` and one `record()` round trip.

Two services of bench/breaker.yaml over the same server, `bench_on` (breaker enabled, the default) and
`bench_off` (`breaker: {enabled: false}`), one worker process each with the same concurrency, one broker.

Run from the repository root (REDIS_URL unset: an embedded Redis is started for the run):
    REDIS_URL=redis://127.0.0.1:6379/0 .venv/bin/python -m bench.breaker
"""

from __future__ import annotations

import statistics
import time
from contextlib import ExitStack
from typing import Any

from redis import Redis

from bench._common import NAMESPACE, ROOT, Workers, broker, median, scratch, table
from orchestrator import Orchestrator, Workflow, load_config
from orchestrator.breaker import BreakerSettings, CircuitBreaker

CONFIG = ROOT / "bench" / "breaker.yaml"
SERVICES = {"on": "bench_on", "off": "bench_off"}
INSTANCE = "safla"  # the server both services name
CALLS = 500
ROUNDS = 5
CONCURRENCY = 100
MICRO = 2000


def fanout(service: str) -> Workflow:
    step = {"service": service, "tool": "noop", "depends_on": []}
    return Workflow.model_validate({"id": f"noop-{service}", "steps": [{**step, "id": f"s{i}"} for i in range(CALLS)]})


def calls_per_second(orchestrator: Orchestrator, workflow: Workflow) -> float:
    """CALLS / seconds from enqueue to the run's end (read from the run record)."""
    started = time.time()
    result = orchestrator.enqueue(workflow).wait(timeout=120)
    if result.status != "succeeded" or result.finished_at is None:
        raise RuntimeError(f"run {result.id} {result.status}: {result.errors[:3]}")
    return CALLS / (result.finished_at - started)


def micro(url: str) -> dict[str, list[float]]:
    """Microseconds per `acquire()` and per `record()` of a closed breaker, MICRO calls each after a warm-up."""
    with Redis.from_url(url) as redis:
        breaker = CircuitBreaker.of(redis, NAMESPACE, "bench_micro", "x", BreakerSettings())
        try:
            permit = breaker.acquire()
            for _ in range(100):  # scripts loaded, connection open
                breaker.record(breaker.acquire(), False, 0.001)
            times: dict[str, list[float]] = {"acquire()": [], "record()": []}
            for _ in range(MICRO):
                began = time.perf_counter_ns()
                breaker.acquire()
                times["acquire()"].append((time.perf_counter_ns() - began) / 1000)
            for _ in range(MICRO):
                began = time.perf_counter_ns()
                breaker.record(permit, False, 0.001)
                times["record()"].append((time.perf_counter_ns() - began) / 1000)
            return times
        finally:
            breaker.reset()


def main() -> None:
    workflows = {mode: fanout(service) for mode, service in SERVICES.items()}
    rates: dict[str, list[float]] = {mode: [] for mode in SERVICES}
    with scratch(), broker() as url, ExitStack() as stack:
        workers = Workers(url)
        stack.callback(workers.stop)
        for service in SERVICES.values():
            workers.ours(service, CONCURRENCY, CONFIG)
        orchestrator = stack.enter_context(Orchestrator(load_config(CONFIG), redis_url=url))

        for workflow in workflows.values():  # warm-up: MCP servers started, queues checked, thread pools filled
            calls_per_second(orchestrator, workflow)
        for i in range(ROUNDS):  # interleaved, the order swapped each round, so drift hits both alike
            for mode in ("on", "off") if i % 2 == 0 else ("off", "on"):
                rates[mode].append(calls_per_second(orchestrator, workflows[mode]))
        redis: Redis = stack.enter_context(Redis.from_url(url))
        on_calls = CircuitBreaker.of(redis, NAMESPACE, SERVICES["on"], INSTANCE, BreakerSettings()).snapshot().calls
        off_key = redis.exists(f"{NAMESPACE}:breaker:{SERVICES['off']}:{INSTANCE}")
        latencies = micro(url)

    print(f"breaker cost: one workflow of {CALLS} parallel noop steps, {ROUNDS} rounds each after a warm-up, "
          f"broker {url}")  # fmt: skip
    print(f"one mcp-orchestrator worker process per service, -P threads -c {CONCURRENCY}")
    rows: list[list[Any]] = [
        [f"breaker {mode} ({SERVICES[mode]})", median(r), min(r), max(r), " ".join(f"{x:.1f}" for x in r)]
        for mode, r in rates.items()
    ]
    print(table(["", "median calls/s", "min", "max", "all rounds (calls/s)"], rows))
    on, off = median(rates["on"]), median(rates["off"])
    print(f"ratio off/on: {off / on:.3f}; breaker overhead: {(1 - on / off) * 100:.1f}% of throughput (goal <= 5%)")
    print(f"check: {SERVICES['on']} breaker window holds {on_calls} calls; {SERVICES['off']} breaker key exists: "
          f"{bool(off_key)}")  # fmt: skip
    print(f"one round trip to the broker, {MICRO} calls each (microseconds):")
    micro_rows = [[name, median(v), statistics.quantiles(v, n=100)[98], min(v)] for name, v in latencies.items()]
    print(table(["", "median us", "p99 us", "min us"], micro_rows))


if __name__ == "__main__":
    main()
