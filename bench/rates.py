"""A fleet-wide rate limit, as the MCP server sees it: calls per second over every window of a run.

Two worker processes serve one service limited to `--rate` calls a second (`limits: {rate: "20/s"}`); a fan-out of
`--calls` calls is enqueued at once, and the server (tests/servers/testing.py's `stamp`) writes down when each call
reached it. Goal: every `--window`-second window within 10% of the rate.

    REDIS_URL=redis://127.0.0.1:6379/0 .venv/bin/python -m bench.rates [--calls 200] [--rate 20] [--window 5]
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import yaml

from bench._common import HOME, ROOT, Workers, broker, scratch, table, timed_run
from orchestrator import Orchestrator, Workflow, load_config


def stamped(calls: int, ledger: str) -> Workflow:
    return Workflow.model_validate({"id": "rated", "steps": [
        {"id": f"s{i}", "service": "rated", "tool": "stamp", "parameters": {"path": ledger}, "depends_on": []}
        for i in range(calls)
    ]})  # fmt: skip


def windows(stamps: list[float], seconds: float) -> list[float]:
    """Calls per second in every window of `seconds` that starts at a call and ends within the run."""
    return [sum(1 for t in stamps if start <= t < start + seconds) / seconds
            for start in stamps if start + seconds <= stamps[-1]]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rate", type=int, default=20, help="the service's limit, calls per second")
    parser.add_argument("--window", type=float, default=5.0, help="seconds")
    options = parser.parse_args()
    config, ledger = HOME / "rated.yaml", HOME / "stamps"
    config.write_text(yaml.safe_dump({
        "servers": {"rated": {"command": sys.executable, "args": [str(ROOT / "tests" / "servers" / "testing.py")]}},
        "services": {"rated": {"server": "rated", "timeout": 600, "limits": {"rate": f"{options.rate}/s"}}},
    }))  # fmt: skip
    with scratch(), broker() as url, contextlib.ExitStack() as stack:
        workers = Workers(url)
        stack.callback(workers.stop)
        orchestrator = stack.enter_context(Orchestrator(load_config(config), redis_url=url))
        workers.ours("rated", 50, config)
        workers.ours("rated", 50, config)
        timed_run(orchestrator, stamped(4, str(HOME / "warm-up")), timeout=60)  # sessions open on both workers
        result, _, _ = timed_run(orchestrator, stamped(options.calls, str(ledger)), timeout=600)
        assert result.status == "succeeded", result.errors
        stamps = sorted(float(line) for line in ledger.read_text().split())
    spread = windows(stamps, options.window)
    overall = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    rows = [["whole run", overall, overall / options.rate - 1],
            [f"busiest {options.window:g} s window", max(spread), max(spread) / options.rate - 1],
            [f"quietest {options.window:g} s window", min(spread), min(spread) / options.rate - 1]]  # fmt: skip
    print(table([f"{options.calls} calls under {options.rate}/s, 2 workers", "calls/s", "off the rate"], rows))
    worst = max(abs(rate / options.rate - 1) for rate in spread)
    print(f"every {options.window:g} s window within {100 * worst:.1f}% of {options.rate}/s (goal: within 10%)")


if __name__ == "__main__":
    main()
