"""Per-step overhead: a 50-step chain of `noop` through the orchestrator, a raw Celery chain of 50 no-op
tasks, and 50 sequential `noop` calls on one direct MCP session.

Run from the repository root (REDIS_URL unset: an embedded Redis is started for the run):
    REDIS_URL=redis://127.0.0.1:6379/0 .venv/bin/python -m bench.step_overhead
"""

from __future__ import annotations

import time
from typing import Any

from celery import chain
from mcp import Client

from bench import raw_app
from bench._common import median, ours_and_raw, table, timed_run
from orchestrator import Orchestrator, Workflow
from orchestrator.results import RunResult

STEPS = 50
ROUNDS = 5
CONCURRENCY = 100  # the worker default; a chain has one task in flight, so this only sizes the thread pool
CHAIN = Workflow.model_validate(
    {"id": "chain", "steps": [{"id": f"s{i}", "service": "bench", "tool": "noop"} for i in range(STEPS)]}
)


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


def main() -> None:
    with ours_and_raw(CONCURRENCY) as (orchestrator, session, url):
        ours(orchestrator)  # warm-up: MCP servers started, queues checked, connections open
        raw()
        session.run(direct(session.client))
        times: dict[str, list[float]] = {"ours": [], "raw": [], "direct": []}
        parts: list[dict[str, float]] = []
        for _ in range(ROUNDS):  # interleaved, so drift on a shared machine hits all three alike
            took, part = ours(orchestrator)
            times["ours"].append(took)
            parts.append(part)
            times["raw"].append(raw())
            times["direct"].append(session.run(direct(session.client)))

    per_step = {name: [t / STEPS * 1000 for t in values] for name, values in times.items()}
    labels = {"ours": "ours (orchestrator chain)", "raw": "raw Celery chain", "direct": "direct MCP session"}
    print(f"step overhead: {STEPS}-step chain of noop, {ROUNDS} rounds after a warm-up, broker {url}")
    print(f"one worker process each (ours: mcp-orchestrator worker; raw: celery worker), -P threads -c {CONCURRENCY}")
    rows: list[list[Any]] = [
        [labels[name], median(v), min(v), max(v), " ".join(f"{x:.2f}" for x in v)] for name, v in per_step.items()
    ]
    print(table(["", "median ms/step", "min", "max", "all rounds (ms/step)"], rows))
    ratio = median(per_step["ours"]) / median(per_step["raw"])
    print(f"ratio ours/raw-celery: {ratio:.2f}x (goal <= 1.5x)")
    print(f"ratio ours/direct-MCP: {median(per_step['ours']) / median(per_step['direct']):.2f}x")
    print("ours, where the time goes (ms, median over rounds):")
    for key in parts[0]:
        print(f"  {key}: {median([p[key] for p in parts]):.2f}")


if __name__ == "__main__":
    main()
