"""The response cache: calls/s of a read-only workload with the cache on and off, and what a hit costs a worker.

One worker process serves two services over the same server (tests/servers/testing.py, whose `lookup` says it is
read-only and takes `--seconds` to answer): `cached` keeps answers (`cache: {ttl: 600}`), `plain` does not. Each
round fans out `--calls` calls over `--distinct` different arguments, in turn on each side; the cache is cleared
before each of its rounds, so every round on it pays its misses (one call per distinct argument: identical calls
in flight wait for the first). Then a round of hits only is timed with the worker's CPU. Goals: on/off ≥ 5x, a
hit ≤ 0.5 ms of worker CPU.

    REDIS_URL=redis://127.0.0.1:6379/0 .venv/bin/python -m bench.cache [--calls 2000] [--distinct 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import yaml

from bench._common import HOME, ROOT, Workers, broker, cpu_seconds, median, scratch, table, timed_run
from orchestrator import Orchestrator, Workflow, load_config


def workload(service: str, calls: int, distinct: int, seconds: float) -> Workflow:
    ledger = str(HOME / f"ledger-{service}")
    return Workflow.model_validate({"id": f"lookups-{service}", "steps": [
        {"id": f"l{i}", "service": service, "tool": "lookup", "depends_on": [],
         "parameters": {"path": ledger, "key": f"k{i % distinct}", "seconds": seconds}}
        for i in range(calls)
    ]})  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--distinct", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=0.05, help="how long the server takes to answer")
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    server = {"command": sys.executable, "args": [str(ROOT / "tests" / "servers" / "testing.py")]}
    config = HOME / "cached.yaml"
    config.write_text(yaml.safe_dump({
        "servers": {"lookups": server},
        "services": {"cached": {"server": "lookups", "cache": {"ttl": 600, "tools": ["lookup"]}},
                     "plain": {"server": "lookups"}},
        "limits": {"steps": max(1000, options.calls)},
    }))  # fmt: skip
    rates: dict[str, list[float]] = {"cached": [], "plain": []}
    with scratch(), broker() as url, contextlib.ExitStack() as stack:
        workers = Workers(url)
        stack.callback(workers.stop)
        workers.ours("cached", 100, config)
        workers.ours("plain", 100, config)
        orchestrator = stack.enter_context(Orchestrator(load_config(config), redis_url=url))
        for service in rates:  # warm-up: sessions open, code paths loaded
            timed_run(orchestrator, workload(service, 50, 50, 0), timeout=120)
        for _ in range(options.rounds):
            for service, seen in rates.items():
                orchestrator.fleet.clear_cache(service)
                result, started, _ = timed_run(orchestrator, workload(service, options.calls, options.distinct,
                                                                      options.seconds), timeout=600)  # fmt: skip
                seen.append(options.calls / (result.finished_at - started))
        worker = workers.processes[0].pid
        before = cpu_seconds(worker, children=False)
        result, started, _ = timed_run(orchestrator, workload("cached", options.calls, options.distinct,
                                                              options.seconds), timeout=600)  # fmt: skip
        per_hit = (cpu_seconds(worker, children=False) - before) / options.calls
        hits = sum(step.status == "cached" for step in result.steps.values())
    rows = [[side, median(seen), min(seen), max(seen)] for side, seen in rates.items()]
    print(table([f"{options.calls} lookups over {options.distinct} arguments, calls/s", "median", "min", "max"], rows))
    print(f"cache on / off: {median(rates['cached']) / median(rates['plain']):.2f}x (goal >= 5x)")
    print(f"a round of hits only ({hits} of {options.calls} cached): {1000 * per_hit:.2f} ms of worker CPU a call "
          "(goal <= 0.5 ms)")  # fmt: skip


if __name__ == "__main__":
    main()
