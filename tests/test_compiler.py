"""Compiling step graphs: series-parallel shapes exactly, other shapes safely, and Celery's pitfalls."""

from __future__ import annotations

from celery import group
from celery.canvas import Signature, _chain, _chord

from orchestrator.compiler import Parallel, Series, shape, step_call, to_canvas
from orchestrator.config import parse_config
from orchestrator.workflow import Graph, Step, Workflow, plan
from workers.app import app


def graph(spec: dict[str, list[str]]) -> Graph:
    steps = [Step(id=name, service="s", tool="t", depends_on=deps) for name, deps in spec.items()]
    return plan(Workflow(steps=steps), "w")


def task(step_id: str) -> Signature:
    return app.signature("mcpo.call", kwargs={"step_id": step_id}, immutable=True)


FINISH = app.signature("mcpo.finish", args=("run",), immutable=True)


def test_sequence_form_is_a_chain() -> None:
    wf = Workflow.model_validate({"steps": [{"service": "s", "tool": "a"}, {"service": "s", "tool": "b"}]})
    assert shape(plan(wf, "w")) == Series(("a", "b"))


def test_parallel_steps_follow_the_sequence() -> None:
    wf = Workflow.model_validate({
        "steps": [{"service": "s", "tool": "a"}],
        "parallelSteps": [
            [{"service": "s", "tool": "b"}, {"service": "s", "tool": "c"}],
            [{"service": "s", "tool": "d"}],
        ],
    })  # fmt: skip
    assert shape(plan(wf, "w")) == Series(("a", Parallel(("b", "c")), "d"))


def test_diamond() -> None:
    assert shape(graph({"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]})) == Series(("a", Parallel(("b", "c")), "d"))


def test_nested_series_parallel_is_exact() -> None:
    result = shape(graph({"a": [], "b": ["a"], "c": ["a"], "d": ["b"], "e": ["c"], "f": ["d", "e"], "x": []}))
    assert result == Parallel((Series(("a", Parallel((Series(("b", "d")), Series(("c", "e")))), "f")), "x"))


def test_non_series_parallel_shape_splits_at_its_sources() -> None:
    # The "N": c needs a and b, d needs only b. Sources first, then the rest: every dependency holds.
    assert shape(graph({"a": [], "b": [], "c": ["a", "b"], "d": ["b"]})) == Series(
        (Parallel(("a", "b")), Parallel(("c", "d")))
    )


def test_empty_workflow_is_only_the_finish_task() -> None:
    canvas = to_canvas(shape(graph({})), task, FINISH)
    assert canvas is FINISH


def test_single_step_group_is_the_step_itself() -> None:
    wf = Workflow.model_validate({"parallelSteps": [[{"service": "s", "tool": "a"}]]})
    canvas = to_canvas(shape(plan(wf, "w")), task, FINISH)
    assert isinstance(canvas, _chain)
    assert [t.task for t in canvas.tasks] == ["mcpo.call", "mcpo.finish"]
    assert not any(isinstance(t, group) for t in canvas.tasks)


def test_final_fan_out_becomes_a_chord_with_the_finish_callback() -> None:
    canvas = to_canvas(shape(graph({"a": [], "b": [], "c": []})), task, FINISH)
    assert isinstance(canvas, _chord)
    assert [t.kwargs["step_id"] for t in canvas.tasks] == ["a", "b", "c"]
    assert canvas.body.task == "mcpo.finish"


def test_chains_are_flat() -> None:
    canvas = to_canvas(Series(("a", Series(("b", "c")))), task, FINISH)
    assert [t.kwargs.get("step_id", "finish") for t in canvas.tasks] == ["a", "b", "c", "finish"]


def test_a_chain_ending_in_a_group_inside_a_group_keeps_that_groups_results() -> None:
    # Celery joins such a group's results from the backend: ignoring them would hang the outer chord.
    canvas = to_canvas(Parallel((Series(("p", Parallel(("q1", "q2")))), "x")), task, FINISH)
    assert isinstance(canvas, _chord)
    branch, single = canvas.tasks
    assert [t.options.get("ignore_result") for t in branch.tasks[-1].tasks] == [False, False]
    assert branch.tasks[0].options.get("ignore_result") is None and single.options.get("ignore_result") is None


def test_a_steps_budget_is_resolved_once_when_it_is_planned() -> None:
    config = parse_config({
        "servers": {"a": {"command": "a"}, "b": {"command": "b"}},
        "services": {"slow": {"server": "a", "timeout": 45, "retries": 5}, "spare": {"server": "b", "timeout": 7}},
    })  # fmt: skip
    workflow = Workflow.model_validate({"steps": [
        {"id": "inherits", "service": "slow", "tool": "t", "fallback": "spare"},
        {"id": "own", "service": "slow", "tool": "t", "timeout": 3, "retries": 0},
    ]})  # fmt: skip
    inherits, own = config.graph(workflow, "w").steps
    assert (inherits.timeout, inherits.retries, own.timeout, own.retries) == (45, 5, 3, 0)
    assert inherits.fallback is not None and (inherits.fallback.timeout, inherits.fallback.retries) == (7, 3)
    # The message copies the plan: the service's values are not read again.
    config.services["slow"] = config.services["slow"].model_copy(update={"timeout": 99.0, "retries": 9})
    call = step_call("run", inherits)
    assert (call.timeout, call.retries) == (45, 5)
    assert call.fallback == {"service": "spare", "tool": "t", "arguments": {}, "timeout": 7, "retries": 3}
    assert (step_call("run", own).timeout, step_call("run", own).retries) == (3, 0)
