"""Idempotency: each MCP call carries its run's and step's key in `_meta`; an enqueue key returns the run it started."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from orchestrator import Orchestrator, Workflow
from orchestrator.errors import IdempotencyConflict
from orchestrator.history.flusher import Flusher
from orchestrator.history.records import RecordStore
from orchestrator.idempotency import META_KEY, Claim, EnqueueKeys, request_digest

from .conftest import ROOT, TEST_SERVICES, RecordsDatabase


def tallied(ledger: Path) -> list[str]:
    return ledger.read_text().split() if ledger.exists() else []


def tally_workflow(ledger: Path) -> Workflow:
    return Workflow.model_validate({"id": "tallied", "steps": [
        {"id": "count", "service": "testing", "tool": "tally",
         "parameters": {"path": str(ledger), "tag": "${ params.tag }", "seconds": 0.5}},
    ]})  # fmt: skip


def test_each_call_carries_run_and_step_as_its_idempotency_key(test_orch: Orchestrator) -> None:
    workflow = Workflow.model_validate({"id": "meta", "steps": [
        {"id": "first", "service": "testing", "tool": "meta", "depends_on": []},
        {"id": "second", "service": "testing", "tool": "meta", "depends_on": ["first"]},
    ]})  # fmt: skip
    result = test_orch.enqueue(workflow).wait(60)
    assert result.status == "succeeded", result.errors
    assert result.steps["first"].output[META_KEY] == f"{result.id}:first"
    assert result.steps["second"].output[META_KEY] == f"{result.id}:second"


def test_a_repeated_key_returns_the_run_it_started(test_orch: Orchestrator, tmp_path: Path,
                                                   records_database: RecordsDatabase) -> None:  # fmt: skip
    ledger, key = tmp_path / "ledger", f"order-{uuid.uuid4().hex}"
    first = test_orch.enqueue(tally_workflow(ledger), {"tag": "once"}, idempotency_key=key)
    again = test_orch.enqueue(tally_workflow(ledger), {"tag": "once"}, idempotency_key=key)
    assert again.id == first.id
    result = first.wait(60)
    assert result.status == "succeeded" and result.idempotency_key == key
    assert test_orch.start(tally_workflow(ledger), {"tag": "once"}, idempotency_key=key).id == first.id
    assert tallied(ledger) == ["once"]
    other = test_orch.enqueue(tally_workflow(ledger), {"tag": "once"}, idempotency_key=f"{key}-2").wait(60)
    assert other.id != first.id and tallied(ledger) == ["once", "once"]

    store = RecordStore(records_database.url)
    Flusher(test_orch.connect().redis, test_orch.connect().namespace, store).flush(60)
    assert store.load(first.id).idempotency_key == key


def test_the_same_key_with_other_params_is_refused(test_orch: Orchestrator, tmp_path: Path) -> None:
    ledger, key = tmp_path / "ledger", f"order-{uuid.uuid4().hex}"
    test_orch.enqueue(tally_workflow(ledger), {"tag": "one"}, idempotency_key=key).wait(60)
    with pytest.raises(IdempotencyConflict, match="other params"):
        test_orch.enqueue(tally_workflow(ledger), {"tag": "two"}, idempotency_key=key)
    with pytest.raises(IdempotencyConflict, match="printable"):
        test_orch.enqueue(tally_workflow(ledger), {"tag": "one"}, idempotency_key="x" * 201)
    assert tallied(ledger) == ["one"]


def test_concurrent_enqueues_with_one_key_start_one_run(test_orch: Orchestrator, tmp_path: Path,
                                                        worker_env: dict[str, str]) -> None:  # fmt: skip
    ledger, key = tmp_path / "ledger", f"order-{uuid.uuid4().hex}"
    workflow = tmp_path / "tallied.yaml"
    workflow.write_text(tally_workflow(ledger).model_dump_json(by_alias=True, exclude_unset=True))
    command = [sys.executable, "-m", "orchestrator.cli", "enqueue", str(workflow), "--config", str(TEST_SERVICES),
               "--param", "tag=concurrent", "--idempotency-key", key]  # fmt: skip
    callers = [subprocess.Popen(command, env=worker_env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for _ in range(4)]  # fmt: skip
    answers: list[Any] = [caller.communicate(timeout=120) for caller in callers]
    assert all(caller.returncode == 0 for caller in callers), [err for _, err in answers]
    run_ids = {out.strip() for out, _ in answers}
    assert len(run_ids) == 1
    assert test_orch.status(run_ids.pop()).status in ("pending", "running", "succeeded")
    result = test_orch.enqueue(tally_workflow(ledger), {"tag": "concurrent"}, idempotency_key=key).wait(60)
    assert result.status == "succeeded" and tallied(ledger) == ["concurrent"]


def test_cli_refuses_a_key_reused_for_other_params_with_one_line(test_orch: Orchestrator, tmp_path: Path,
                                                                 worker_env: dict[str, str]) -> None:  # fmt: skip
    ledger, key = tmp_path / "ledger", f"order-{uuid.uuid4().hex}"
    test_orch.enqueue(tally_workflow(ledger), {"tag": "one"}, idempotency_key=key)
    workflow = tmp_path / "tallied.yaml"
    workflow.write_text(tally_workflow(ledger).model_dump_json(by_alias=True, exclude_unset=True))
    refused = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "enqueue", str(workflow), "--config", str(TEST_SERVICES),
         "--param", "tag=two", "--idempotency-key", key],
        env=worker_env, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: idempotency key") and len(refused.stderr.strip().splitlines()) == 1


def test_a_claim_whose_caller_died_before_starting_its_run_is_taken_over(test_orch: Orchestrator,
                                                                         tmp_path: Path) -> None:  # fmt: skip
    store, key = test_orch.connect(), f"order-{uuid.uuid4().hex}"
    keys = EnqueueKeys(store.redis, store.namespace)
    request = request_digest(tally_workflow(tmp_path / "ledger").version(), {"tag": "late"})
    assert keys.claim(key, None, Claim("dead" * 8, "tallied", request), store.exists) is None  # then its caller dies
    started = time.monotonic()
    assert keys.claim(key, None, Claim("next" * 8, "tallied", request), store.exists, wait=1.0) is None
    assert time.monotonic() - started >= 1.0 and keys.holder(key, None) == "next" * 8
