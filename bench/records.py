"""Records on vs off: per-step time of the 50-step chain of `noop` (bench.step_overhead's chain) through a
worker that records every step (events pushed in the run store's pipelines, a flusher thread writing SQL)
and through one with MCPO_RECORDS=off, rounds interleaved.

The records go to DATABASE_URL, else to a SQLite file under the run's temporary home. Run from the root:
    REDIS_URL=redis://127.0.0.1:6379/0 .venv/bin/python -m bench.records
"""

from __future__ import annotations

from pathlib import Path

import yaml

from bench._common import CONFIG, HOME, Workers, broker, median, scratch, table, timed_run
from bench.step_overhead import STEPS
from orchestrator import Orchestrator, Workflow, load_config
from orchestrator.history.flusher import Flusher
from orchestrator.history.records import RecordStore, describe

ROUNDS = 7
CONCURRENCY = 100


def chain(service: str) -> Workflow:
    return Workflow.model_validate(
        {"id": f"chain-{service}", "steps": [{"id": f"s{i}", "service": service, "tool": "noop"} for i in range(STEPS)]}
    )


def two_services() -> Path:
    """bench/services.yaml with a second service on the same server: one queue per side of the comparison."""
    config = yaml.safe_load(CONFIG.read_text())
    config["servers"]["safla"]["args"] = [
        str((CONFIG.parent / arg).resolve()) for arg in config["servers"]["safla"]["args"]
    ]
    config["services"]["bench_off"] = dict(config["services"]["bench"])
    path = HOME / "records-bench.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def per_step(orchestrator: Orchestrator, workflow: Workflow) -> float:
    result, started, _ = timed_run(orchestrator, workflow, 120)
    return (result.finished_at - started) / STEPS * 1000


def main() -> None:
    import celeryconfig

    config = two_services()
    with scratch(), broker() as url:
        on, off = Workers(url), Workers(url)
        off.env["MCPO_RECORDS"] = "off"
        try:
            on.ours("bench", CONCURRENCY, config)
            off.ours("bench_off", CONCURRENCY, config)
            with Orchestrator(load_config(config), redis_url=url) as orchestrator:
                sides = {"records on": chain("bench"), "records off": chain("bench_off")}
                for workflow in sides.values():
                    per_step(orchestrator, workflow)  # warm-up: MCP servers started, connections open
                times: dict[str, list[float]] = {name: [] for name in sides}
                for _ in range(ROUNDS):
                    for name, workflow in sides.items():
                        times[name].append(per_step(orchestrator, workflow))
                store = RecordStore(celeryconfig.settings.records_url)
                flusher = Flusher(orchestrator.connect().redis, orchestrator.connect().namespace, store)
                flusher.flush(120)
                recorded = len(store.runs(workflow="chain-bench", limit=1000))
        finally:
            on.stop()
            off.stop()
    print(f"records: {STEPS}-step chain of noop, {ROUNDS} rounds after a warm-up, broker {url}")
    print(f"records database {describe(store.url)}; {recorded} recorded runs of the records-on chain")
    rows = [[name, median(v), min(v), max(v), " ".join(f"{x:.2f}" for x in v)] for name, v in times.items()]
    print(table(["", "median ms/step", "min", "max", "all rounds (ms/step)"], rows))
    overhead = median(times["records on"]) / median(times["records off"]) - 1
    paired = sorted(a / b - 1 for a, b in zip(times["records on"], times["records off"], strict=True))
    print(f"records overhead: {overhead * 100:+.1f}% (median of medians; goal <= +10%); "
          f"round by round {paired[0] * 100:+.1f}% to {paired[-1] * 100:+.1f}%")  # fmt: skip


if __name__ == "__main__":
    main()
