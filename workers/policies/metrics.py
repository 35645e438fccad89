"""Per-call metrics of one worker process: attempts counted by service, tool, instance and outcome, and their
latency in buckets — the counters an exporter reads. Labels never hold run ids or arguments, so their number
stays bounded by the fleet's configuration."""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from dataclasses import dataclass, field

from orchestrator.messages import StepCall
from workers.pipeline import Attempt, Policy

# Upper bounds of the latency buckets, in seconds (Prometheus' defaults, and one for what takes longer).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf"))

Labels = tuple[str, str, str, str]  # service, tool, instance, outcome ("ok" or the error's type)


@dataclass
class Latency:
    """How many attempts fell in each bucket, and their total time."""

    buckets: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.buckets[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds


class CallMetrics(Policy):
    """Counts every attempt of every call this process makes, and observes how long it took."""

    def __init__(self) -> None:
        self.calls: Counter[Labels] = Counter()
        self.latency: dict[Labels, Latency] = {}
        self._lock = threading.Lock()  # hooks run on the worker's task threads

    def attempted(self, call: StepCall, attempt: Attempt, error: Exception | None, seconds: float) -> None:
        instance = attempt.result.instance or ""
        labels = (call.service, call.tool, instance, "ok" if error is None else type(error).__name__)
        with self._lock:
            self.calls[labels] += 1
            self.latency.setdefault(labels, Latency()).observe(seconds)

    def snapshot(self) -> dict[Labels, tuple[int, Latency]]:
        """Each label set's count and latency, copied: the process goes on counting meanwhile."""
        with self._lock:
            return {labels: (count, _copy(self.latency[labels])) for labels, count in self.calls.items()}


def _copy(latency: Latency) -> Latency:
    return Latency(list(latency.buckets), latency.total)
