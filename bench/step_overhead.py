"""Per-step overhead: a 50-step chain of `noop` through the orchestrator, a raw Celery chain of 50 no-op
tasks, and 50 sequential `noop` calls on one direct MCP session.

Run from the repository root (REDIS_URL unset: an embedded Redis is started for the run):
    REDIS_URL=redis://127.0.0.1:6379/0 .venv/bin/python -m bench.step_overhead [--secure] [--rounds N]

With --secure, the same chain also runs, interleaved, on a secured fleet (bench/secure.py): Celery message
signing, each step's caller token checked by the worker (an operator's token) and the MCP server's
credential from the vault, all on at once: the cost of security per step, in time and, less sensitive to a
busy machine, in CPU (each side's worker with its MCP server, and Redis, accounted around each run; not the
clients, where security costs one signature a run).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable
from typing import Any, TypeVar

from celery import chain
from mcp import Client
from redis import Redis

from bench import raw_app
from bench._common import median, ours_and_raw, process_cpu, table, timed_run
from bench.secure import secured
from orchestrator import Orchestrator, Workflow
from orchestrator.results import RunResult

T = TypeVar("T")
STEPS = 50
ROUNDS = 5
CONCURRENCY = 100  # the worker default; a chain has one task in flight, so this only sizes the thread pool


def noop_chain(service: str) -> dict[str, Any]:
    """The chain: STEPS `noop` calls on a service, one after another."""
    return {"id": "chain", "steps": [{"id": f"s{i}", "service": service, "tool": "noop"} for i in range(STEPS)]}


CHAIN = Workflow.model_validate(noop_chain("bench"))


def ours(orchestrator: Orchestrator) -> tuple[float, dict[str, float]]:
    """Seconds from enqueue to the run's end, and where the time went (ms)."""
    result, started, enqueued = timed_run(orchestrator, CHAIN, 60)
    return result.finished_at - started, breakdown(result, started, enqueued)


def breakdown(result: RunResult, started: float, enqueued: float) -> dict[str, float]:
    steps = [result.steps[f"s{i}"] for i in range(STEPS)]
    begin = [s.started_at or 0.0 for s in steps]
    end = [s.finished_at or 0.0 for s in steps]
    return {
        "enqueue": (enqueued - started) * 1000,
        "to first step": (begin[0] - enqueued) * 1000,
        "in step (median)": median([(e - b) * 1000 for b, e in zip(begin, end, strict=True)]),
        "between steps (median)": median([(b - e) * 1000 for e, b in zip(end, begin[1:], strict=False)]),
        "last step to run end": ((result.finished_at or 0.0) - end[-1]) * 1000,
    }


def raw() -> float:
    started = time.perf_counter()
    chain(*(raw_app.noop.si() for _ in range(STEPS))).apply_async().get(timeout=60)
    return time.perf_counter() - started


async def direct(client: Client) -> float:
    started = time.perf_counter()
    for _ in range(STEPS):
        await client.call_tool("noop", {})
    return time.perf_counter() - started


def accounted(run: Callable[[], T], worker: int, redis: Redis, cpu: list[float]) -> T:
    """Run one chain; append the CPU seconds its worker (with its MCP server) and Redis spent to `cpu`."""
    before = process_cpu([worker], redis)
    outcome = run()
    cpu.append(process_cpu([worker], redis) - before)
    return outcome


def secured_ratio(secure: list[float], plain: list[float]) -> str:
    """The goal's ratio of the medians, and the same round by round: the two runs of a round saw the same
    machine, so their ratio shows how much of the spread is noise."""
    paired = [s / p for s, p in zip(secure, plain, strict=True)]
    return (f"ratio secured/plain: {median(secure) / median(plain):.2f}x (goal <= 1.15x); round by round "
            f"{min(paired):.2f}-{max(paired):.2f}x, median {median(paired):.2f}x")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--secure", action="store_true", help="also run the chain with signing, caller-token "
                        "checks and the vault on")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"timed rounds (default {ROUNDS})")
    arguments = parser.parse_args()
    secure_on, rounds = arguments.secure, arguments.rounds
    with ours_and_raw(CONCURRENCY) as (orchestrator, session, url, pids), contextlib.ExitStack() as stack:
        worker = pids[0]
        # The secured client warms up as it starts (bench/secure_client.py).
        secure = stack.enter_context(secured(url, noop_chain("secure"), CONCURRENCY)) if secure_on else None
        redis = stack.enter_context(Redis.from_url(url))
        ours(orchestrator)  # warm-up: MCP servers started, queues checked, connections open
        raw()
        session.run(direct(session.client))
        times: dict[str, list[float]] = {name: [] for name in ["ours", "secure", "raw", "direct"]}
        cpu: dict[str, list[float]] = {"ours": [], "secure": []}
        parts: list[dict[str, float]] = []
        for number in range(rounds):  # interleaved, so drift on a shared machine hits all alike
            # The secured chain goes first every other round: neither side always runs right after the other.
            if secure is not None and number % 2:
                times["secure"].append(accounted(secure.run, secure.worker, redis, cpu["secure"]))
            took, part = accounted(lambda: ours(orchestrator), worker, redis, cpu["ours"])
            times["ours"].append(took)
            parts.append(part)
            if secure is not None and not number % 2:
                times["secure"].append(accounted(secure.run, secure.worker, redis, cpu["secure"]))
            times["raw"].append(raw())
            times["direct"].append(session.run(direct(session.client)))

    per_step = {name: [t / STEPS * 1000 for t in values] for name, values in times.items() if values}
    labels = {"ours": "ours (orchestrator chain)", "secure": "ours, secured (signing, tokens, vault)",
              "raw": "raw Celery chain", "direct": "direct MCP session"}  # fmt: skip
    print(f"step overhead: {STEPS}-step chain of noop, {rounds} rounds after a warm-up, broker {url}")
    print(f"one worker process each (ours: mcp-orchestrator worker; raw: celery worker), -P threads -c {CONCURRENCY}")
    rows: list[list[Any]] = [
        [labels[name], median(v), min(v), max(v), " ".join(f"{x:.2f}" for x in v)] for name, v in per_step.items()
    ]
    print(table(["", "median ms/step", "min", "max", "all rounds (ms/step)"], rows))
    ratio = median(per_step["ours"]) / median(per_step["raw"])
    print(f"ratio ours/raw-celery: {ratio:.2f}x (goal <= 1.5x)")
    print(f"ratio ours/direct-MCP: {median(per_step['ours']) / median(per_step['direct']):.2f}x")
    # A step of ours is a Celery task that makes an MCP call: raw Celery's step plus the direct call is what a
    # step costs with nothing of ours in it.
    floor = median(per_step["raw"]) + median(per_step["direct"])
    print(f"floor (raw Celery step + direct MCP call): {floor:.2f} ms/step, {floor / median(per_step['raw']):.2f}x "
          f"raw Celery; ours beyond it: {median(per_step['ours']) - floor:.2f} ms/step")  # fmt: skip
    if secure_on:
        print(secured_ratio(per_step["secure"], per_step["ours"]))
        spent = {name: 1000 * sum(seconds) / (STEPS * len(seconds)) for name, seconds in cpu.items()}
        print(
            f"CPU per step (worker and its MCP server, Redis): secured {spent['secure']:.2f} ms, plain "
            f"{spent['ours']:.2f} ms: {(spent['secure'] / spent['ours'] - 1) * 100:+.1f}%"
        )
    print("ours, where the time goes (ms, median over rounds):")
    for key in parts[0]:
        print(f"  {key}: {median([p[key] for p in parts]):.2f}")


if __name__ == "__main__":
    main()
