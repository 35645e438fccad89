"""Horizontal scale: calls/s of a CPU-light tool with one worker process on a service, then two.

Same run, same broker: a fan-out of `noop` calls is timed with one `mcp-orchestrator worker` serving the
`bench` service, a second worker is started on the same service with no other change, and the same
fan-out is timed again. Goal: two workers at least 1.7x one, on two cores.

It also accounts for the CPU each call costs, by process (workers, the MCP servers they started, Redis,
this client), during the one-worker rounds: with every part on the same cores, cores / (CPU per call) is
the most calls/s the machine can give, whatever the number of workers, and so bounds the ratio.

    REDIS_URL=redis://127.0.0.1:6379/0 .venv/bin/python -m bench.scale [--calls 600] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import time

from redis import Redis

from bench._common import CONFIG, Workers, broker, cpu_seconds, median, redis_cpu, scratch, table, timed_run
from orchestrator import Orchestrator, Workflow, load_config


def fan_out(calls: int) -> Workflow:
    return Workflow.model_validate({"id": "scale", "steps": [
        {"id": f"n{i}", "service": "bench", "tool": "noop", "parameters": {}, "depends_on": []} for i in range(calls)
    ]})  # fmt: skip


def calls_per_second(orchestrator: Orchestrator, calls: int, rounds: int) -> list[float]:
    rates = []
    for _ in range(rounds):
        result, started, _ = timed_run(orchestrator, fan_out(calls), timeout=600)
        rates.append(calls / (result.finished_at - started))
    return rates


def cpu_by_part(workers: Workers, redis: Redis) -> dict[str, float]:
    return {
        "workers": sum(cpu_seconds(process.pid) for process in workers.processes) - mcp_servers(workers),
        "MCP servers": mcp_servers(workers),
        "Redis": redis_cpu(redis),
        "client": sum(os.times()[:2]),
    }


def mcp_servers(workers: Workers) -> float:
    total = 0.0
    for process in workers.processes:
        for child in subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split():
            total += cpu_seconds(int(child))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=50, help="threads per worker process")
    options = parser.parse_args()
    with scratch(), broker() as url, contextlib.ExitStack() as stack:
        workers = Workers(url)
        stack.callback(workers.stop)
        orchestrator = stack.enter_context(Orchestrator(load_config(CONFIG), redis_url=url))
        workers.ours("bench", options.concurrency)
        calls_per_second(orchestrator, 50, 1)  # warm-up: sessions open, code paths loaded
        redis = stack.enter_context(Redis.from_url(url))
        before, began = cpu_by_part(workers, redis), time.monotonic()
        one = calls_per_second(orchestrator, options.calls, options.rounds)
        spent = {part: cpu - before[part] for part, cpu in cpu_by_part(workers, redis).items()}
        elapsed = time.monotonic() - began
        workers.ours("bench", options.concurrency)
        calls_per_second(orchestrator, 50, 1)
        two = calls_per_second(orchestrator, options.calls, options.rounds)
    rows = [["1 worker", median(one), min(one), max(one)], ["2 workers", median(two), min(two), max(two)]]
    print(table(["noop fan-out, calls/s", "median", "min", "max"], rows))
    print(f"2 workers / 1 worker: {median(two) / median(one):.2f}x (goal >= 1.7x)")
    calls = options.calls * options.rounds
    print(table(["one worker: CPU per call", "ms", "% of a core"],
                [[part, 1000 * cpu / calls, 100 * cpu / elapsed] for part, cpu in spent.items()]))  # fmt: skip
    per_call = sum(spent.values()) / calls
    ceiling = (os.cpu_count() or 1) / per_call
    print(f"ceiling on {os.cpu_count()} cores: {ceiling:.0f} calls/s = {ceiling / median(one):.2f}x one worker")


if __name__ == "__main__":
    main()
