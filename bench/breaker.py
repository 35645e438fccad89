"""The circuit breaker's cost: calls/s of 500 parallel `noop` steps with the breaker on and off, and the
latency of one `acquire()` and one `record()` round trip. Each mode's CPU per call (its worker process and
Redis) is accounted too: on a shared machine it is a steadier measure of the cost than calls/s.

Two services of bench/breaker.yaml over the same server, `bench_on` (breaker enabled, the default) and
`bench_off` (`breaker: {enabled: false}`), one worker process each with the same concurrency, one broker.

Run from the repository root (REDIS_URL unset: an embedded Redis is started for the run):
    REDIS_URL=redis://127.0.0.1:6379/0 .venv/bin/python -m bench.breaker
"""

from __future__ import annotations

import os
import statistics
import time
from contextlib import ExitStack
from typing import Any

# Records off on both sides: one flusher at a time writes every process's records, so whichever worker
# happened to flush would be charged the other's CPU.
os.environ["MCPO_RECORDS"] = "off"

from redis import Redis

from bench._common import NAMESPACE, ROOT, Workers, broker, cpu_seconds, median, redis_cpu, scratch, table
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


def rounds(orchestrator: Orchestrator, workflows: dict[str, Workflow], workers: dict[str, int],
           redis: Redis) -> tuple[dict[str, list[float]], dict[str, dict[str, float]]]:  # fmt: skip
    """Calls/s of each mode's rounds, interleaved with the order swapped each round so drift hits both alike,
    and the CPU seconds each mode's rounds cost its worker process (not its MCP server) and Redis."""
    rates: dict[str, list[float]] = {mode: [] for mode in workflows}
    cpu = {mode: {"worker": 0.0, "Redis": 0.0} for mode in workflows}
    for i in range(ROUNDS):
        for mode in ("on", "off") if i % 2 == 0 else ("off", "on"):
            worker, server = cpu_seconds(workers[mode], children=False), redis_cpu(redis)
            rates[mode].append(calls_per_second(orchestrator, workflows[mode]))
            cpu[mode]["worker"] += cpu_seconds(workers[mode], children=False) - worker
            cpu[mode]["Redis"] += redis_cpu(redis) - server
    return rates, cpu


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
    with scratch(), broker() as url, ExitStack() as stack:
        workers = Workers(url)
        stack.callback(workers.stop)
        for service in SERVICES.values():
            workers.ours(service, CONCURRENCY, CONFIG)
        orchestrator = stack.enter_context(Orchestrator(load_config(CONFIG), redis_url=url))

        for workflow in workflows.values():  # warm-up: MCP servers started, queues checked, thread pools filled
            calls_per_second(orchestrator, workflow)
        redis: Redis = stack.enter_context(Redis.from_url(url))
        pids = {mode: process.pid for mode, process in zip(SERVICES, workers.processes, strict=True)}
        rates, cpu = rounds(orchestrator, workflows, pids, redis)
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
    calls = CALLS * ROUNDS
    cpu_rows = [[f"breaker {mode}", *(1000 * spent[part] / calls for part in ("worker", "Redis")),
                 1000 * sum(spent.values()) / calls] for mode, spent in cpu.items()]  # fmt: skip
    print(table(["CPU per call", "worker ms", "Redis ms", "both ms"], cpu_rows))
    on_cpu, off_cpu = (sum(cpu[mode].values()) for mode in ("on", "off"))
    print(f"breaker overhead in CPU per call (worker + Redis): {(on_cpu / off_cpu - 1) * 100:.1f}% (the throughput "
          f"of CPU-bound calls goes as its inverse; less noisy than calls/s on a shared machine)")  # fmt: skip
    print(f"check: {SERVICES['on']} breaker window holds {on_calls} calls; {SERVICES['off']} breaker key exists: "
          f"{bool(off_key)}")  # fmt: skip
    print(f"one round trip to the broker, {MICRO} calls each (microseconds):")
    micro_rows = [[name, median(v), statistics.quantiles(v, n=100)[98], min(v)] for name, v in latencies.items()]
    print(table(["", "median us", "p99 us", "min us"], micro_rows))


if __name__ == "__main__":
    main()
