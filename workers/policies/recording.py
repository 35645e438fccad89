"""The step's record: its result in the run's state and its event for the SQL records and the audit chain, queued
on the round trip that ends the call (the flusher writes the events to SQL; orchestrator/history/)."""

from __future__ import annotations

from redis.client import Pipeline as RedisPipeline

from orchestrator.messages import StepCall
from orchestrator.results import StepResult
from orchestrator.runs import RunStore
from workers.pipeline import Attempt, Policy


class Recording(Policy):
    """Records each step's final result."""

    def __init__(self, store: RunStore) -> None:
        self.store = store

    def recording(self, call: StepCall, result: StepResult, pipe: RedisPipeline, attempt: Attempt) -> None:
        self.store.save_step(call.run_id, call.step_id, result, pipe)
