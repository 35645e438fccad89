"""Per-step overhead: a 50-step chain of `noop` through the orchestrator, a raw Celery chain of 50 no-op
tasks, and 50 sequential `noop` calls on one direct MCP session.

Run from the repository root (REDIS_URL unset: an embedded Redis is started for the run):
    REDIS_URL=redis://127.0.0.1:6379/0 .venv/bin/python -m bench.step_overhead [--access]

With --access, the same chain also runs, interleaved, on a worker whose configuration switches access control
on (an operator's token; each step's caller token checked by the worker): the cost of security per step.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path
from typing import Any

from celery import chain
from mcp import Client

from bench import raw_app
from bench._common import CONFIG, HOME, Workers, median, ours_and_raw, table, timed_run
from orchestrator import Orchestrator, Workflow
from orchestrator.results import RunResult

STEPS = 50
ROUNDS = 5
CONCURRENCY = 100  # the worker default; a chain has one task in flight, so this only sizes the thread pool
CHAIN = Workflow.model_validate(
    {"id": "chain", "steps": [{"id": f"s{i}", "service": "bench", "tool": "noop"} for i in range(STEPS)]}
)


SECURE_CHAIN = Workflow.model_validate(
    {"id": "chain", "steps": [{"id": f"s{i}", "service": "secure", "tool": "noop"} for i in range(STEPS)]}
)


def ours(orchestrator: Orchestrator, workflow: Workflow = CHAIN) -> tuple[float, dict[str, float]]:
    """Seconds from enqueue to the run's end, and where the time went (ms)."""
    result, started, enqueued = timed_run(orchestrator, workflow, 60)
    return result.finished_at - started, breakdown(result, started, enqueued)


@contextlib.contextmanager
def secured(url: str) -> Any:
    """An orchestrator with access control on, over a worker of its own (service `secure`), and an operator's
    token: the key file and the token live in the benchmark's home."""
    import yaml
    from redis import Redis

    from orchestrator import load_config
    from orchestrator.identity import SigningKey, TokenBook

    config = yaml.safe_load(CONFIG.read_text())
    config["servers"]["safla"]["args"] = [str((CONFIG.parent / config["servers"]["safla"]["args"][0]).resolve())]
    config["services"] = {"secure": {**config["services"]["bench"]}}
    config["access"] = {"enabled": True}
    path = Path(HOME) / "secure.yaml"
    path.write_text(yaml.safe_dump(config))
    SigningKey.from_environment().ensure()
    with Redis.from_url(url) as redis:
        token, _ = TokenBook(redis, celeryconfig_namespace()).issue("bench", "operator", 3600)
    workers = Workers(url)
    try:
        workers.ours("secure", CONCURRENCY, path)
        with Orchestrator(load_config(path), redis_url=url, token=token) as orchestrator:
            yield orchestrator
    finally:
        workers.stop()


def celeryconfig_namespace() -> str:
    import celeryconfig

    return celeryconfig.settings.namespace


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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--access", action="store_true", help="also run the chain with access control on")
    access = parser.parse_args().access
    with ours_and_raw(CONCURRENCY) as (orchestrator, session, url), contextlib.ExitStack() as stack:
        secure = stack.enter_context(secured(url)) if access else None
        ours(orchestrator)  # warm-up: MCP servers started, queues checked, connections open
        if secure is not None:
            ours(secure, SECURE_CHAIN)
        raw()
        session.run(direct(session.client))
        times: dict[str, list[float]] = {"ours": [], "raw": [], "direct": []} | ({"secure": []} if access else {})
        parts: list[dict[str, float]] = []
        for _ in range(ROUNDS):  # interleaved, so drift on a shared machine hits all alike
            took, part = ours(orchestrator)
            times["ours"].append(took)
            parts.append(part)
            if secure is not None:
                times["secure"].append(ours(secure, SECURE_CHAIN)[0])
            times["raw"].append(raw())
            times["direct"].append(session.run(direct(session.client)))

    per_step = {name: [t / STEPS * 1000 for t in values] for name, values in times.items()}
    labels = {"ours": "ours (orchestrator chain)", "secure": "ours, access control on", "raw": "raw Celery chain",
              "direct": "direct MCP session"}  # fmt: skip
    print(f"step overhead: {STEPS}-step chain of noop, {ROUNDS} rounds after a warm-up, broker {url}")
    print(f"one worker process each (ours: mcp-orchestrator worker; raw: celery worker), -P threads -c {CONCURRENCY}")
    rows: list[list[Any]] = [
        [labels[name], median(v), min(v), max(v), " ".join(f"{x:.2f}" for x in v)] for name, v in per_step.items()
    ]
    print(table(["", "median ms/step", "min", "max", "all rounds (ms/step)"], rows))
    ratio = median(per_step["ours"]) / median(per_step["raw"])
    print(f"ratio ours/raw-celery: {ratio:.2f}x (goal <= 1.5x)")
    print(f"ratio ours/direct-MCP: {median(per_step['ours']) / median(per_step['direct']):.2f}x")
    if access:
        print(f"ratio access on/off: {median(per_step['secure']) / median(per_step['ours']):.2f}x (goal <= 1.15x)")
    print("ours, where the time goes (ms, median over rounds):")
    for key in parts[0]:
        print(f"  {key}: {median([p[key] for p in parts]):.2f}")


if __name__ == "__main__":
    main()
