"""The secured side's client, a process of its own: Celery message signing is global to a process (kombu's
serializer registry), so the benchmark's own process, whose plain orchestrator sends unsigned messages,
cannot also sign. Started by bench/secure.py with the secured fleet's namespace and caller token in its
environment; it does not import bench._common, which would give it a namespace of its own.

    python -m bench.secure_client CONFIG WORKFLOW

Prints `ready` once a worker serves the workflow's queue and one warm-up run is done; then, for each line
read on stdin, runs the workflow once and prints the seconds from enqueue to the run's end.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from orchestrator import Orchestrator, load_config
from workers.app import queue_for, served_queues

READY_WITHIN = 60.0  # seconds for the secured worker to serve its queue


def timed(orchestrator: Orchestrator, workflow: str) -> float:
    """Seconds from enqueue to the run's end as its record says (as bench._common.timed_run measures)."""
    started = time.time()
    result = orchestrator.enqueue(workflow).wait(timeout=60)
    if result.status != "succeeded" or result.finished_at is None:
        raise RuntimeError(f"run {result.id} {result.status}: {result.errors[:3]}")
    return result.finished_at - started


def wait_for_worker(orchestrator: Orchestrator, service: str) -> None:
    # Only a signed process can ask a signed worker which queues it serves; the parent cannot.
    orchestrator.connect()  # sets up signing before the first control message
    deadline = time.monotonic() + READY_WITHIN
    while queue_for(service) not in served_queues(0.5):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no worker serves {queue_for(service)} within {READY_WITHIN:.0f} s")


def main() -> None:
    config, workflow = load_config(Path(sys.argv[1])), sys.argv[2]
    with Orchestrator(config) as orchestrator:  # REDIS_URL and MCPO_TOKEN come from the environment
        wait_for_worker(orchestrator, next(iter(config.services)))
        timed(orchestrator, workflow)  # warm-up: the MCP server started, connections open
        print("ready", flush=True)
        for _ in sys.stdin:
            print(f"{timed(orchestrator, workflow):.6f}", flush=True)


if __name__ == "__main__":
    main()
