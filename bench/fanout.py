"""Fan-out throughput: 1000 parallel `sleep(seconds=0.05)` calls, one worker process each side with concurrency 100.

(a) ours: one workflow of 1000 parallel steps, sent in batch messages (the default: orchestrator/batching.py);
(a') the same with `batch: false`, one message per call; (b) a raw Celery chord of 1000 `time.sleep(0.05)` tasks;
(c) the naive way: a raw Celery task opening a new MCP stdio session per call (20 calls a round, extrapolated);
(d) the limit: asyncio.gather of 1000 calls on one direct MCP session. CPU per call is counted by process for
(a), (a') and (b). Then one run of 10 000 parallel 10 ms calls: its time, and the enqueuing process's memory.

Run from the repository root (REDIS_URL unset: an embedded Redis is started for the run):
    REDIS_URL=redis://127.0.0.1:6379/0 .venv/bin/python -m bench.fanout
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from celery import chord
from mcp import Client

from bench import raw_app
from bench._common import cpu_seconds, median, ours_and_raw, redis_cpu, table, timed_run
from orchestrator import Orchestrator, Workflow
from orchestrator.results import RunResult

CALLS = 1000
SECONDS = 0.05
BIG_CALLS = 10_000
BIG_SECONDS = 0.01
CONCURRENCY = 100
NAIVE_CALLS = 20
ROUNDS = 3


def fanout(width: int, seconds: float = SECONDS) -> Workflow:
    step = {"service": "bench", "tool": "sleep", "parameters": {"seconds": seconds}, "depends_on": []}
    return Workflow.model_validate({"id": f"fanout-{width}", "steps": [{**step, "id": f"s{i}"} for i in range(width)]})


def ours(orchestrator: Orchestrator, workflow: Workflow) -> tuple[float, dict[str, float]]:
    """Seconds from enqueue to the run's end, and where the time went."""
    result, started, enqueued = timed_run(orchestrator, workflow, 120)
    return result.finished_at - started, breakdown(result, started, enqueued)


def breakdown(result: RunResult, started: float, enqueued: float) -> dict[str, float]:
    begin = sorted(s.started_at or 0.0 for s in result.steps.values())
    end = sorted(s.finished_at or 0.0 for s in result.steps.values())
    events = sorted([(t, 1) for t in begin] + [(t, -1) for t in end])
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    return {  # seconds after enqueue() was called, unless named otherwise
        "enqueue() returned (s)": enqueued - started,
        "first step started (s)": begin[0] - started,
        "last step ended (s)": end[-1] - started,
        "run ended (s)": (result.finished_at or 0.0) - started,
        "step duration, median (ms)": median([s.duration_ms or 0.0 for s in result.steps.values()]),
        "peak steps in flight": float(peak),
    }


def raw_chord(task: Any, count: int, *args: Any) -> float:
    """Seconds for a chord of `count` raw tasks (and a no-op callback) to end, from before it is sent."""
    started = time.perf_counter()
    chord(task.si(*args) for _ in range(count))(raw_app.noop.si()).get(timeout=120)
    return time.perf_counter() - started


async def direct(client: Client, count: int) -> float:
    started = time.perf_counter()
    results = await asyncio.gather(*(client.call_tool("sleep", {"seconds": SECONDS}) for _ in range(count)))
    if any(r.is_error for r in results):
        raise RuntimeError("a direct call failed")
    return time.perf_counter() - started


class Meter:
    """CPU seconds per call by process, summed over the rounds of each side: its worker alone, the worker's MCP
    server (its children), this enqueuing and following process, and Redis."""

    def __init__(self, redis: Any, workers: dict[str, int]) -> None:
        self.redis = redis
        self.workers = workers
        self.used: dict[str, dict[str, float]] = {}
        self.calls: dict[str, int] = {}

    def _now(self, side: str) -> dict[str, float]:
        worker = self.workers[side]
        own = cpu_seconds(worker, children=False)
        times = os.times()
        return {"worker": own, "MCP server": cpu_seconds(worker) - own, "client": times.user + times.system,
                "Redis": redis_cpu(self.redis)}  # fmt: skip

    @contextlib.contextmanager
    def around(self, side: str, calls: int) -> Iterator[None]:
        before = self._now(side)
        yield
        after = self._now(side)
        used = self.used.setdefault(side, {})
        for name, value in after.items():
            used[name] = used.get(name, 0.0) + value - before[name]
        self.calls[side] = self.calls.get(side, 0) + calls

    def per_call_ms(self, side: str) -> dict[str, float]:
        return {name: value * 1000 / self.calls[side] for name, value in self.used[side].items()}


def batching(orchestrator: Orchestrator, on: bool) -> Callable[[], None]:
    """Turn batching for the bench service on or off at enqueue (it is decided there); returns the undo."""
    service = orchestrator.config.services["bench"]
    kept = service.batch
    service.batch = kept if on else None

    def undo() -> None:
        service.batch = kept

    return undo


def memory_kib(field: str) -> int:
    """This process's resident memory now (VmRSS) or at its peak (VmHWM), in KiB."""
    for line in open("/proc/self/status"):  # noqa: SIM115
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    workflow = fanout(CALLS)
    with ours_and_raw(CONCURRENCY) as (orchestrator, session, url, pids):
        ours(orchestrator, fanout(10))  # warm-up: MCP servers started, queues checked, connections open
        ours(orchestrator, fanout(40))  # and a batch
        raw_chord(raw_app.sleep, 10, SECONDS)
        session.run(direct(session.client, 10))
        meter = Meter(orchestrator.connect().redis, {"ours": pids[0], "unbatched": pids[0], "raw": pids[1]})
        times: dict[str, list[float]] = {"ours": [], "unbatched": [], "raw": [], "direct": [], "naive": []}
        parts: list[dict[str, float]] = []
        for _ in range(ROUNDS):  # interleaved, so drift on a shared machine hits all alike
            with meter.around("ours", CALLS):
                took, part = ours(orchestrator, workflow)
            times["ours"].append(took)
            parts.append(part)
            undo = batching(orchestrator, on=False)
            try:
                with meter.around("unbatched", CALLS):
                    times["unbatched"].append(ours(orchestrator, workflow)[0])
            finally:
                undo()
            with meter.around("raw", CALLS):
                times["raw"].append(raw_chord(raw_app.sleep, CALLS, SECONDS))
            times["direct"].append(session.run(direct(session.client, CALLS)))
            # Every round: one sample of 20 calls varied by 1.5x from run to run, more than the goal's margin.
            times["naive"].append(raw_chord(raw_app.naive_call, NAIVE_CALLS, "sleep", {"seconds": SECONDS}))
        rss_before = memory_kib("VmRSS")
        big, big_started, big_enqueued = timed_run(orchestrator, fanout(BIG_CALLS, BIG_SECONDS), 600)
        big_peak, rss_after = memory_kib("VmHWM"), memory_kib("VmRSS")

    rates = {name: [(NAIVE_CALLS if name == "naive" else CALLS) / t for t in values] for name, values in times.items()}
    rows: list[list[Any]] = [
        ["(a) ours: 1000-step parallel workflow, batched", rates["ours"]],
        ["(a') ours, batch: false", rates["unbatched"]],
        ["(b) raw Celery chord, time.sleep", rates["raw"]],
        [f"(c) naive: new MCP session per call ({NAIVE_CALLS} calls)", rates["naive"]],
        ["(d) limit: asyncio.gather, one MCP session", rates["direct"]],
    ]
    print(f"fan-out: {CALLS} parallel sleep({SECONDS}) calls, {ROUNDS} rounds after a warm-up, broker {url}")
    print(f"one worker process each (ours: mcp-orchestrator worker; raw: celery worker), -P threads -c {CONCURRENCY}")
    print(f"ideal at concurrency {CONCURRENCY}: {CONCURRENCY / SECONDS:.0f} calls/s")
    print(
        table(
            ["", "median calls/s", "all rounds (calls/s)"],
            [[label, median(r), " ".join(f"{x:.1f}" for x in r)] for label, r in rows],
        )
    )
    ours_rate = median(rates["ours"])
    paired = [o / r for o, r in zip(rates["ours"], rates["raw"], strict=True)]
    print(f"ratio ours/raw-celery: {ours_rate / median(rates['raw']):.2f} (goal >= 2, aim 3); round by round "
          f"{min(paired):.2f}-{max(paired):.2f}")  # fmt: skip
    print(f"ratio ours/unbatched: {ours_rate / median(rates['unbatched']):.2f}")
    paired = [o / n for o, n in zip(rates["ours"], rates["naive"], strict=True)]
    print(f"ratio ours/naive: {ours_rate / median(rates['naive']):.0f} (goal >= 150); round by round "
          f"{min(paired):.0f}-{max(paired):.0f}")  # fmt: skip
    print(f"ratio ours/direct-gather: {ours_rate / median(rates['direct']):.2f}")
    # What the naive goal asks, set against Celery itself: its chord of bare sleeps makes no MCP call at all.
    print(f"ratio raw-celery/naive: {median(rates['raw']) / median(rates['naive']):.0f}")
    print("CPU per call (ms), by process, over every round (worker: goal <= 0.9 ms):")
    names = list(meter.per_call_ms("ours"))
    print(table(["", *names], [[side, *meter.per_call_ms(side).values()] for side in ("ours", "unbatched", "raw")]))
    print("ours, where the time goes (median over rounds):")
    for key in parts[0]:
        print(f"  {key}: {median([p[key] for p in parts]):.3f}")
    took = (big.finished_at or 0.0) - big_started
    print(f"{BIG_CALLS} parallel sleep({BIG_SECONDS}) calls: {big.status}, enqueue() took "
          f"{big_enqueued - big_started:.2f} s, the run {took:.2f} s ({BIG_CALLS / took:.0f} calls/s); the enqueuing "
          f"process's memory {rss_before / 1024:.0f} MiB before, {rss_after / 1024:.0f} MiB after, "
          f"peak {big_peak / 1024:.0f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
