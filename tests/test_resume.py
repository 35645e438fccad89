"""Resume: a new run of an ended run's workflow takes over the outputs of the steps that succeeded and runs the rest
again (or from a named step on), linked to the original in the records."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator import Orchestrator, Workflow, load_config
from orchestrator.errors import NotResumable, PermissionDenied, RunNotFound
from orchestrator.history.flusher import Flusher
from orchestrator.history.records import RecordStore
from orchestrator.security.identity import SigningKey, TokenBook

from .conftest import ROOT, TEST_SERVICES, RecordsDatabase


def tallied(ledger: Path) -> dict[str, int]:
    tags = ledger.read_text().split() if ledger.exists() else []
    return {tag: tags.count(tag) for tag in sorted(set(tags))}


def chain(ledger: Path) -> Workflow:
    """a → b → c, and d after a: each tallies its own tag; b sleeps `params.seconds`."""

    def step(name: str, after: list[str], seconds: Any = 0) -> dict[str, Any]:
        parameters = {"path": str(ledger), "tag": name, "seconds": seconds, "value": f"{name}-out"}
        return {"id": name, "service": "testing", "tool": "tally", "depends_on": after, "parameters": parameters}

    return Workflow.model_validate({"id": "resumable", "steps": [
        step("a", []), step("b", ["a"], "${ params.seconds }"), step("c", ["b"]), step("d", ["a"]),
    ]})  # fmt: skip


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "orchestrator.cli", *args, "--config", str(TEST_SERVICES)]
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)


def wait_for_step(orch: Orchestrator, run_id: str, step_id: str, status: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while orch.status(run_id).steps[step_id].status != status:
        assert time.monotonic() < deadline, f"step {step_id} never {status}"
        time.sleep(0.05)


def test_resume_of_a_cancelled_run_calls_only_the_steps_that_did_not_succeed(test_orch: Orchestrator,
                                                                             tmp_path: Path) -> None:  # fmt: skip
    ledger = tmp_path / "ledger"
    run = test_orch.enqueue(chain(ledger), {"seconds": 2})
    wait_for_step(test_orch, run.id, "b", "running")
    deadline = time.monotonic() + 30
    while "b" not in tallied(ledger):  # b's call reached the server (a step is marked running before it calls)
        assert time.monotonic() < deadline, "b's call never reached the server"
        time.sleep(0.05)
    test_orch.cancel(run.id)
    cancelled = run.wait(60)
    assert cancelled.status == "cancelled" and cancelled.steps["a"].status == "succeeded"

    resumed = test_orch.resume(run.id).wait(60)
    assert resumed.status == "succeeded", resumed.errors
    assert resumed.resumed_from == run.id and resumed.id != run.id
    assert resumed.steps["a"].reused_from == run.id and resumed.steps["a"].output == cancelled.steps["a"].output
    assert all(resumed.steps[s].reused_from is None for s in "bc")
    assert resumed.output == {"c": {"tag": "c", "value": "c-out"}, "d": {"tag": "d", "value": "d-out"}}
    assert resumed.params == {"seconds": 2}
    calls = tallied(ledger)
    assert calls["a"] == 1 and calls["b"] == 2 and calls["c"] == 1
    # d (after a only) may have finished before the cancel, or while it was settling (a call in flight is not
    # cut off): then it is taken over, else it runs again.
    d_reused = resumed.steps["d"].reused_from == run.id
    assert d_reused or cancelled.steps["d"].status != "succeeded"
    if d_reused:
        assert test_orch.status(run.id).steps["d"].status == "succeeded" and calls["d"] == 1
    else:
        assert calls["d"] in (1, 2)  # once more, unless the cancel came before its first call reached the server


def test_resume_from_a_step_runs_it_and_every_step_after_it_and_the_records_link_them(
    test_orch: Orchestrator, tmp_path: Path, worker_env: dict[str, str], records_database: RecordsDatabase
) -> None:
    ledger = tmp_path / "ledger"
    original = test_orch.enqueue(chain(ledger), {"seconds": 0}).wait(60)
    assert original.status == "succeeded"

    shown = cli(worker_env, "resume", original.id, "--from", "b", "--json", "--timeout", "60")
    assert shown.returncode == 0, shown.stderr
    resumed = json.loads(shown.stdout)
    assert resumed["status"] == "succeeded" and resumed["resumed_from"] == original.id
    assert {s: step["reused_from"] for s, step in resumed["steps"].items()} == {
        "a": original.id, "b": None, "c": None, "d": original.id}  # fmt: skip
    assert tallied(ledger) == {"a": 1, "b": 2, "c": 2, "d": 1}

    store = RecordStore(records_database.url)
    Flusher(test_orch.connect().redis, test_orch.connect().namespace, store).flush(60)
    recorded = store.load(resumed["id"])
    assert recorded.resumed_from == original.id and recorded.status == "succeeded"
    assert recorded.steps["a"].reused_from == original.id
    assert recorded.steps["a"].output == {"tag": "a", "value": "a-out"}
    assert recorded.steps["c"].reused_from is None and recorded.steps["c"].status == "succeeded"


def test_resume_reads_a_run_redis_forgot_from_the_records(test_orch: Orchestrator, tmp_path: Path,
                                                          records_database: RecordsDatabase) -> None:  # fmt: skip
    ledger = tmp_path / "ledger"
    run = test_orch.enqueue(chain(ledger), {"seconds": 0})
    original = run.wait(60)
    store = RecordStore(records_database.url)
    Flusher(test_orch.connect().redis, test_orch.connect().namespace, store).flush(60)
    namespace = test_orch.connect().namespace
    test_orch.connect().redis.delete(f"{namespace}:run:{run.id}", f"{namespace}:run:{run.id}:steps")  # as if expired

    resumed = test_orch.resume(run.id, from_step="c").wait(60)
    assert resumed.status == "succeeded", resumed.errors
    assert resumed.output == original.output
    assert {s for s, step in resumed.steps.items() if step.reused_from == run.id} == {"a", "b", "d"}
    assert tallied(ledger) == {"a": 1, "b": 1, "c": 2, "d": 1}


def test_what_cannot_be_resumed_is_refused_with_one_line(test_orch: Orchestrator, tmp_path: Path,
                                                        worker_env: dict[str, str]) -> None:  # fmt: skip
    ledger = tmp_path / "ledger"
    running = test_orch.enqueue(chain(ledger), {"seconds": 30})
    wait_for_step(test_orch, running.id, "b", "running")
    with pytest.raises(NotResumable, match="still running"):
        test_orch.resume(running.id)
    with pytest.raises(RunNotFound):
        test_orch.resume("0" * 32)
    done = test_orch.enqueue(chain(ledger), {"seconds": 0}).wait(60)
    with pytest.raises(NotResumable, match="has no step 'nope'"):
        test_orch.resume(done.id, from_step="nope")
    with pytest.raises(NotResumable, match="--from STEP"):
        test_orch.resume(done.id)

    for args, says in [
        ((running.id,), f"error: run {running.id} is still running"),
        (("0" * 32,), f"error: run {'0' * 32} is not known"),
        ((done.id, "--from", "nope"), f"error: run {done.id}: workflow 'resumable' has no step 'nope'"),
    ]:
        refused = cli(worker_env, "resume", *args)
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.startswith(says) and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    test_orch.cancel(running.id)


def test_resume_needs_read_and_enqueue_on_the_workflow(test_orch: Orchestrator, tmp_path: Path,
                                                       redis_url: str) -> None:  # fmt: skip
    ledger = tmp_path / "ledger"
    original = test_orch.enqueue(chain(ledger), {"seconds": 0}).wait(60)
    config = yaml.safe_load(TEST_SERVICES.read_text())
    config["servers"]["testing"]["args"] = [str(TEST_SERVICES.parent / "servers" / "testing.py")]
    config["access"] = {"enabled": True, "roles": {"starter": {"permissions": {"enqueue": ["workflow:*"]}}}}
    path = tmp_path / "secure.yaml"
    path.write_text(yaml.safe_dump(config))
    SigningKey.from_environment().ensure()  # caller tokens are signed with the key the workers share
    book = TokenBook(test_orch.connect().redis, test_orch.connect().namespace)
    tokens = {role: book.issue(f"{role}-user", role, 600)[0] for role in ("viewer", "starter", "operator")}
    for role, denied in [("viewer", "enqueue"), ("starter", "read")]:
        with (
            Orchestrator(load_config(path), redis_url=redis_url, token=tokens[role]) as orch,
            pytest.raises(PermissionDenied, match=f"may not {denied} on workflow:resumable"),
        ):
            orch.resume(original.id, from_step="c")
    with Orchestrator(load_config(path), redis_url=redis_url, token=tokens["operator"]) as orch:
        resumed = orch.resume(original.id, from_step="c").wait(60)
    assert resumed.status == "succeeded" and tallied(ledger) == {"a": 1, "b": 1, "c": 2, "d": 1}
