"""A minimal Celery app, the raw-Celery baseline: the broker settings celeryconfig.py uses, no orchestrator.

A worker: `celery -A bench.raw_app worker -P threads -c N -Q $BENCH_RAW_QUEUE` from the repository root with
PYTHONPATH set to it; REDIS_URL and BENCH_RAW_QUEUE come from the environment (the benchmarks set both).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

from celery import Celery
from mcp import Client, StdioServerParameters

URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
QUEUE = os.environ.get("BENCH_RAW_QUEUE", "rawqueue")
SAFLA = Path(__file__).resolve().parent.parent / "examples" / "servers" / "safla.py"

app = Celery("bench_raw", broker=URL, backend=URL)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    broker_transport_options={"visibility_timeout": 3600},
    result_backend_transport_options={"visibility_timeout": 3600},
    broker_connection_retry_on_startup=True,
    task_default_queue=QUEUE,
    worker_hijack_root_logger=False,
    # The benchmark finds this worker up by the same broadcast as its own: the exchanges of its namespace.
    control_exchange=os.environ.get("MCPO_NAMESPACE", "celery"),
    event_exchange=f"{os.environ.get('MCPO_NAMESPACE', 'celery')}.celeryev",
)


def use(url: str, queue: str) -> None:
    """Point this process's raw app at a broker (and result backend) and a queue, as its worker reads them."""
    app.conf.update(broker_url=url, result_backend=url, task_default_queue=queue)


def release() -> None:
    """Stop the result backend's pub/sub, so no unsubscribe runs at interpreter exit (as workers.app does)."""
    consumer = getattr(app.backend, "result_consumer", None)
    if consumer is not None and getattr(consumer, "_pubsub", None) is not None:
        consumer.stop()
        consumer.subscribed_to.clear()


@app.task(name="raw.noop")
def noop() -> None:
    """Do nothing."""


@app.task(name="raw.sleep")
def sleep(seconds: float) -> None:
    time.sleep(seconds)


@app.task(name="raw.naive_call")
def naive_call(tool: str, arguments: dict[str, object]) -> str:
    """The naive way to call MCP from Celery: a new stdio server and session for every call."""
    return asyncio.run(_call_once(tool, arguments))


async def _call_once(tool: str, arguments: dict[str, object]) -> str:
    async with Client(StdioServerParameters(command=sys.executable, args=[str(SAFLA)]), cache=None) as client:
        result = await client.call_tool(tool, arguments)
    return "error" if result.is_error else "ok"
