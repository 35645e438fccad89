"""Quarantine: poison task messages, published raw to a real worker's queue, go to the dead letters with the reason;
the worker stays up and serves the next run."""

from __future__ import annotations

import json
import time
import uuid
from types import SimpleNamespace
from typing import Any

import pytest
from redis import Redis

import celeryconfig
import tasks.calls  # noqa: F401  (registers the tasks the check looks up)
from orchestrator import Orchestrator, Workflow
from orchestrator.deadletters import DeadLetter, DeadLetters
from workers.app import app, queue_for
from workers.quarantine import refusal

from .conftest import WorkerProcesses

GOOD_BODY = json.dumps([[], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])


def _headers(probe: str, task: str = "mcpo.health", **overrides: Any) -> dict[str, Any]:
    headers = {"lang": "py", "task": task, "id": uuid.uuid4().hex, "root_id": None, "parent_id": None, "group": None,
               "retries": 0, "eta": None, "expires": None, "timelimit": [None, None], "argsrepr": "()",
               "kwargsrepr": "{}", "origin": "test", "ignore_result": True, "probe": probe}  # fmt: skip
    headers.update(overrides)
    return {k: v for k, v in headers.items() if v != "<absent>"}


# (name, headers overrides, body, a piece of the reason the dead letter must give)
POISON = [
    ("args-dict", {}, json.dumps([{"a": 1}, {}, {}]), "bad body: args dict"),
    ("timelimit-abc", {"timelimit": "abc"}, GOOD_BODY, "bad header `timelimit`: 'abc'"),
    ("not-json", {}, "not json {", "cannot decode the body"),
    ("json-list", {}, json.dumps([1, 2]), "the body is not [args, kwargs, embed]"),
    ("json-number", {}, "42", "the body is not [args, kwargs, embed]: int"),
    ("unknown-task", {"task": "mcpo.nope"}, GOOD_BODY, "unknown task 'mcpo.nope'"),
    ("kwargs-list", {}, json.dumps([[], [1], {}]), "kwargs list"),
    ("bad-signature", {}, json.dumps([[], {"nope": 1}, {}]), "arguments do not fit task mcpo.health"),
    ("no-task-header", {"task": "<absent>"}, GOOD_BODY, "no `task` header"),
    ("bad-eta", {"eta": "tomorrow-ish"}, GOOD_BODY, "bad header `eta`"),
    ("bad-id", {"id": 7}, GOOD_BODY, "bad header `id`"),
    ("batch-not-a-list", {"task": "mcpo.batch"}, json.dumps([[], {"calls": {"a": 1}}, {}]), "`calls` is not a list"),
    (
        "batch-bad-call",
        {"task": "mcpo.batch"},
        json.dumps([[], {"calls": [{"run_id": "r"}]}, {}]),
        "bad batch: call 0 does not fit a step call",
    ),
    ("batch-no-object", {"task": "mcpo.batch"}, json.dumps([[], {"calls": [7]}, {}]), "call 0 is not an object"),
]


def _publish(queue: str, headers: dict[str, Any], body: str) -> None:
    with app.connection_for_write() as connection:
        # A str body with its content type given is sent as it is: kombu does not serialize it.
        connection.Producer().publish(body, routing_key=queue, exchange="", headers=headers,
                                      content_type="application/json", content_encoding="utf-8")  # fmt: skip


def _letter(letters: DeadLetters, probe: str, timeout: float = 45) -> DeadLetter:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for letter in letters.list(1000):
            if letter.envelope.get("headers", {}).get("probe") == probe:
                return letter
        time.sleep(0.2)
    raise AssertionError(f"no dead letter for {probe} within {timeout} s")


@pytest.fixture
def letters(redis_url: str) -> DeadLetters:
    return DeadLetters(Redis.from_url(redis_url), celeryconfig.settings.namespace)


def test_each_poison_message_is_quarantined_and_the_worker_serves_the_next_run(
    test_orch: Orchestrator, workers: WorkerProcesses, letters: DeadLetters
) -> None:
    queue = queue_for("testing")
    alive = [process for process in workers.processes if process.poll() is None]  # other tests stop some
    probes = {name: f"{name}-{uuid.uuid4().hex[:8]}" for name, *_ in POISON}
    for name, overrides, body in ((n, o, b) for n, o, b, _ in POISON):
        _publish(queue, _headers(probes[name], **overrides), body)
    for name, _, body, reason in POISON:
        letter = _letter(letters, probes[name])
        assert reason in letter.reason, (name, letter.reason)
        assert letter.kind == "message" and letter.queue == queue and letter.body == body.encode()
    assert all(process.poll() is None for process in alive)  # no worker died
    assert int(letters.redis.llen(queue)) == 0  # nothing left to come round again
    run = test_orch.enqueue(Workflow.model_validate({"steps": [{"service": "testing", "tool": "echo"}]})).wait(60)
    assert run.status == "succeeded"
    logs = "".join(path.read_text(errors="replace") for path in workers.log_dir.glob("worker-testing-*.log"))
    assert logs.count('"event": "message-refused"') >= len(POISON)
    assert "Unrecoverable error" not in logs


def test_a_good_message_passes_the_check_in_microseconds(test_orch: Orchestrator) -> None:
    """The check's cost per message (the README's figure): headers, a decoded body and the signature."""

    message = SimpleNamespace(headers=_headers("cost", task="mcpo.call"),
                              payload=[[], {"run_id": "r", "step": {}}, {"callbacks": None}])  # fmt: skip
    assert refusal(message, app.tasks) is None
    rounds = 20_000
    began = time.perf_counter()
    for _ in range(rounds):
        refusal(message, app.tasks)
    per_message = (time.perf_counter() - began) / rounds
    print(f"quarantine check: {per_message * 1e6:.1f} µs a message")  # measured here, asserted nowhere


def test_a_quarantined_step_message_fails_its_run_instead_of_leaving_it_running(
    test_orch: Orchestrator, letters: DeadLetters
) -> None:
    workflow = Workflow.model_validate({"steps": [{"id": "only", "service": "testing", "tool": "echo"}]})
    graph = test_orch.config.graph(workflow, "quarantined")
    run_id = uuid.uuid4().hex
    test_orch.connect().write(run_id, test_orch.connect().records(graph, "test", {}))  # as enqueue writes it
    kwargs = {"run_id": run_id, "step_id": "only", "service": "testing", "tool": "echo", "arguments": {},
              "timeout": 30, "retries": 0}  # fmt: skip
    probe = f"step-{uuid.uuid4().hex[:8]}"
    body = json.dumps([[], kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    _publish(queue_for("testing"), _headers(probe, task="mcpo.call", timelimit="abc"), body)
    letter = _letter(letters, probe)
    deadline = time.monotonic() + 30
    while not (run := test_orch.status(run_id)).done and time.monotonic() < deadline:
        time.sleep(0.2)
    assert run.status == "failed"
    assert run.steps["only"].error_type == "MessageRefused"
    assert letter.id in (run.steps["only"].error or "") and "timelimit" in (run.errors[0].message or "")


def test_a_quarantined_batch_message_fails_its_run_and_each_of_its_steps(
    test_orch: Orchestrator, letters: DeadLetters
) -> None:
    steps = [{"id": f"s{i}", "service": "testing", "tool": "echo", "depends_on": []} for i in range(3)]
    graph = test_orch.config.graph(Workflow.model_validate({"steps": steps}), "quarantined")
    run_id = uuid.uuid4().hex
    test_orch.connect().write(run_id, test_orch.connect().records(graph, "test", {}))
    calls = [{"run_id": run_id, "step_id": f"s{i}", "service": "testing", "tool": "echo", "arguments": {},
              "timeout": 30, "retries": 0} for i in range(3)]  # fmt: skip
    calls[1]["colour"] = "blue"  # a field no step call has
    probe = f"batch-{uuid.uuid4().hex[:8]}"
    body = json.dumps([[], {"calls": calls}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    _publish(queue_for("testing"), _headers(probe, task="mcpo.batch"), body)
    letter = _letter(letters, probe)
    assert "bad batch: call 1 does not fit a step call" in letter.reason and "colour" in letter.reason
    deadline = time.monotonic() + 30
    while not (run := test_orch.status(run_id)).done and time.monotonic() < deadline:
        time.sleep(0.2)
    assert run.status == "failed"
    assert {step.error_type for step in run.steps.values()} == {"MessageRefused"}
