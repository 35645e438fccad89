"""The call pipeline: the policies' one order, the first decision winning, and a policy that is one module."""

from __future__ import annotations

import uuid
from pathlib import Path

from orchestrator import load_config
from orchestrator.compiler import step_call
from orchestrator.messages import StepCall
from orchestrator.results import StepResult
from orchestrator.runs import RunStore
from orchestrator.workflow import Step, Workflow
from workers.balancer import Balancer
from workers.credentials import Credentials
from workers.execution import execute_step
from workers.pipeline import AGAIN, SETTLED, Attempt, Decision, Pipeline, Policy
from workers.policies import (
    BreakerWait,
    Caching,
    CallMetrics,
    ConcurrencyLimit,
    Degradation,
    FallbackService,
    Placement,
    RateLimit,
    Recording,
    Retries,
    Sealing,
    StaleAnswers,
    TimeBudget,
    in_order,
)
from workers.runtime import Runtime

from .conftest import TEST_SERVICES

CALL = StepCall(run_id="r", step_id="s", service="svc", tool="t", arguments={}, timeout=5, retries=1)


class Answers(Policy):
    def __init__(self, name: str, decision: Decision | None, heard: list[str]) -> None:
        self.name, self.decision, self.heard = name, decision, heard

    def failed(self, call: StepCall, error: Exception, attempt: Attempt) -> Decision | None:
        self.heard.append(self.name)
        return self.decision


def test_the_first_policy_that_decides_wins_and_none_after_it_is_asked() -> None:
    heard: list[str] = []
    pipeline = Pipeline([Answers("quiet", None, heard), Answers("settles", SETTLED, heard),
                         Answers("late", AGAIN, heard)])  # fmt: skip
    attempt = Attempt({}, StepResult(service="svc", tool="t"))
    assert pipeline.failed(CALL, RuntimeError(), attempt) is SETTLED
    assert heard == ["quiet", "settles"]
    assert Pipeline([Answers("quiet", None, [])]).failed(CALL, RuntimeError(), attempt) is None


def test_the_order_is_written_in_one_place(redis_url: str) -> None:
    from redis import Redis

    config = load_config(TEST_SERVICES)
    store = RunStore(Redis.from_url(redis_url), f"order-{uuid.uuid4().hex[:8]}", 60)
    balancer = Balancer(config, store.redis, store.namespace)
    kinds = [type(policy) for policy in in_order(store, balancer, None, config, Credentials(None))]
    assert kinds == [TimeBudget, Caching, RateLimit, ConcurrencyLimit, Placement, CallMetrics, BreakerWait, Retries,
                     FallbackService, StaleAnswers, Degradation, Sealing, Recording]  # fmt: skip


def test_every_step_option_is_owned_by_a_policy_and_every_option_a_policy_owns_is_a_step_field() -> None:
    from workers import policies

    kinds = [kind for name in policies.__all__ if isinstance(kind := getattr(policies, name), type)]
    owned = {option for kind in kinds if issubclass(kind, Policy) for option in kind.options}
    what_the_call_is = {"id", "service", "tool", "parameters", "depends_on", "when"}
    assert owned == set(Step.model_fields) - what_the_call_is


def test_the_metrics_policy_counts_every_attempt_by_service_tool_instance_and_outcome(redis_url: str) -> None:
    config = load_config(TEST_SERVICES)
    runtime = Runtime.create(config, redis_url)
    try:
        workflow = Workflow.model_validate({"steps": [
            {"id": "ok", "service": "testing", "tool": "echo", "parameters": {"value": 1}, "depends_on": []},
            {"id": "broken", "service": "testing", "tool": "fail", "depends_on": [], "retries": 0},
        ]})  # fmt: skip
        graph = config.graph(workflow, "w")
        run_id = uuid.uuid4().hex
        runtime.store.write(run_id, RunStore.records(graph, "v", {}))
        outcomes = {step.id: execute_step(runtime, step_call(run_id, step), "here") for step in graph.steps}
        assert [getattr(outcome, "status", None) for outcome in outcomes.values()] == ["succeeded", "failed"]
        metrics = runtime.pipeline.find(CallMetrics)
        assert metrics is not None
        snapshot = metrics.snapshot()
        counts = {labels: count for labels, (count, _) in snapshot.items()}
        assert counts == {("testing", "echo", "testing", "ok"): 1, ("testing", "fail", "testing", "ToolError"): 1}
        latency = snapshot[("testing", "echo", "testing", "ok")][1]
        assert sum(latency.buckets) == 1 and 0 < latency.total < 20
    finally:
        runtime.close()


def test_every_hook_is_asked() -> None:
    from workers.pipeline import HOOKS

    hooks = {name for name, value in vars(Policy).items() if callable(value) and not name.startswith("_")}
    assert set(HOOKS) == hooks
    assert all(callable(getattr(Pipeline, hook)) for hook in HOOKS)


def test_a_message_delivered_again_after_its_call_was_recorded_does_not_call_again(redis_url: str,
                                                                                   tmp_path: Path) -> None:  # fmt: skip
    config = load_config(TEST_SERVICES)
    runtime = Runtime.create(config, redis_url)
    try:
        ledger = tmp_path / "ledger"
        workflow = Workflow.model_validate(
            {
                "steps": [
                    {
                        "id": "once",
                        "service": "testing",
                        "tool": "tally",
                        "parameters": {"path": str(ledger)},
                        "depends_on": [],
                    }
                ]
            }
        )
        graph = config.graph(workflow, "w")
        run_id = uuid.uuid4().hex
        runtime.store.write(run_id, RunStore.records(graph, "v", {}))
        call = step_call(run_id, graph.steps[0])
        first = execute_step(runtime, call, "here")
        again = execute_step(runtime, call, "here")  # as a redelivery after a worker died before its ack
        assert isinstance(first, StepResult) and first.status == "succeeded"
        assert again == first and runtime.store.load(run_id).steps["once"] == first  # the record stands
        assert ledger.read_text().split() == ["call"]
    finally:
        runtime.close()
