"""Records end to end: runs through real worker processes land in SQL (PostgreSQL with DATABASE_URL, else
SQLite), the audit chain holds and names the first tampered row, nothing is lost while the database is down."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from redis import Redis
from sqlalchemy import select, text

from orchestrator import Orchestrator, RunResult, Workflow, load_config
from orchestrator.errors import RecordsError
from orchestrator.history import audit, events
from orchestrator.history.flusher import Flusher
from orchestrator.history.records import RecordStore
from orchestrator.history.tables import AuditRecord

from .conftest import ROOT, TEST_SERVICES, RecordsDatabase, WorkerProcesses, scratch_postgres


def records_of(orch: Orchestrator, database: RecordsDatabase) -> tuple[RecordStore, Flusher]:
    store = RecordStore(database.url)
    return store, Flusher(orch.connect().redis, orch.connect().namespace, store)


def audit_rows(store: RecordStore, run_id: str) -> list[AuditRecord]:
    with store.session() as session:
        rows = session.scalars(select(AuditRecord).where(AuditRecord.run_id == run_id).order_by(AuditRecord.seq))
        return [row for row in rows]


def assert_chain_whole(store: RecordStore) -> int:
    with store.session() as session:
        count, problem = audit.verify(session)
    assert problem is None, str(problem)
    return count


def assert_records_match(store: RecordStore, result: RunResult) -> None:
    """The SQL records of a run say, step by step, what the run store said when it ended."""
    recorded = store.load(result.id)
    assert (recorded.status, recorded.workflow, recorded.output) == (result.status, result.workflow, result.output)
    assert recorded.errors == result.errors and recorded.error_summary == result.error_summary
    assert recorded.finished_at is not None and recorded.created_at == result.created_at
    assert list(recorded.steps) == list(result.steps)
    for step_id, step in result.steps.items():
        assert recorded.steps[step_id] == step, step_id
    rows = audit_rows(store, result.id)
    assert rows[0].action == "enqueue"
    for step_id, step in result.steps.items():
        mine = [r for r in rows if r.step_id == step_id]
        if step.status == "skipped":
            assert mine == [], f"{step_id}: a skipped step made no MCP call"
            continue
        attempts = [r for r in mine if r.action == "attempt"]
        assert [r.outcome for r in attempts] == [f"error:{e.type}" for e in step.attempt_errors], step_id
        (call,) = [r for r in mine if r.action == "call"]
        assert (call.outcome, call.service, call.instance, call.tool, call.worker) == (
            step.status, step.service, step.instance, step.tool, step.worker)  # fmt: skip
        assert call.duration_ms == step.duration_ms and call.arguments_digest == step.arguments_digest


def workflow(name: str, steps: list[dict[str, Any]]) -> Workflow:
    return Workflow.model_validate({"id": name, "steps": steps})


def test_records_match_what_happened_step_by_step(test_orch: Orchestrator, records_database: RecordsDatabase) -> None:
    store, flusher = records_of(test_orch, records_database)
    steps = [
        {"id": "first", "service": "testing", "tool": "echo", "depends_on": [],
         "parameters": {"value": "${ params.env }"}},
        {"id": "broken", "service": "testing", "tool": "fail", "depends_on": ["first"], "optional": True,
         "retry_tool_errors": True, "retries": 1, "parameters": {"message": "no"}},
        {"id": "never", "service": "testing", "tool": "echo", "depends_on": ["first"], "when": "params.env == 'prod'"},
        {"id": "last", "service": "testing", "tool": "echo", "depends_on": ["broken", "never"],
         "parameters": {"value": "${ steps.first.output.value }"}},
    ]  # fmt: skip
    result = test_orch.enqueue(workflow("records", steps), {"env": "staging", "api_token": "s3cret"},
                               caller="alice").wait(60)  # fmt: skip
    assert result.status == "succeeded", result.errors
    assert {s: r.status for s, r in result.steps.items()} == {
        "first": "succeeded", "broken": "degraded", "never": "skipped", "last": "succeeded"}  # fmt: skip
    flusher.flush(60)

    assert_records_match(store, result)
    run = store.runs(workflow="records")[0]
    assert (run["id"], run["who"], run["status"]) == (result.id, "alice", "succeeded")
    recorded = store.load(result.id)
    assert recorded.params == {"env": "staging", "api_token": "[redacted]"}
    assert result.steps["first"].arguments_digest == events.digest({"value": "staging"})
    rows = audit_rows(store, result.id)
    assert rows[0].who == "alice" and all(r.who == "alice" for r in rows)
    assert "s3cret" not in json.dumps([r.detail for r in rows])
    assert len([r for r in rows if r.step_id == "broken" and r.action == "attempt"]) == 2
    assert_chain_whole(store)


def test_status_and_show_read_the_records_after_redis_forgot_the_run(
    test_orch: Orchestrator, records_database: RecordsDatabase, worker_env: dict[str, str]
) -> None:
    _, flusher = records_of(test_orch, records_database)
    steps = [{"id": "only", "service": "testing", "tool": "echo", "parameters": {"value": {"big": "x" * 70_000}}}]
    result = test_orch.enqueue(workflow("forgotten", steps)).wait(60)
    assert result.status == "succeeded", result.errors
    flusher.flush(60)
    namespace = test_orch.connect().namespace
    test_orch.connect().redis.delete(f"{namespace}:run:{result.id}", f"{namespace}:run:{result.id}:steps")  # the TTL

    again = test_orch.status(result.id)
    assert again.steps["only"].output["value"] == {"big": "x" * 70_000}  # whole, from the `outputs` table
    assert again.model_dump(exclude={"params"}) == result.model_dump(exclude={"params"})

    cli = [sys.executable, "-m", "orchestrator.cli"]
    shown = subprocess.run([*cli, "show", result.id, "--json"], env=worker_env, cwd=ROOT, capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert RunResult.model_validate_json(shown.stdout).steps["only"].status == "succeeded"
    listed = subprocess.run([*cli, "runs", "--workflow", "forgotten", "--since", "1h", "--json"], env=worker_env,
                            cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    assert [run["id"] for run in json.loads(listed.stdout)] == [result.id]
    bad = subprocess.run([*cli, "runs", "--since", "yesterday"], env=worker_env, cwd=ROOT, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and "--since 'yesterday'" in bad.stderr
    exported = subprocess.run([*cli, "audit", "export"], env=worker_env, cwd=ROOT, capture_output=True, text=True,
                              timeout=60)  # fmt: skip
    lines = [json.loads(line) for line in exported.stdout.splitlines()]
    assert [line["seq"] for line in lines] == list(range(1, len(lines) + 1))
    assert {"enqueue", "call"} <= {line["action"] for line in lines if line["run_id"] == result.id}


def test_a_run_completes_while_the_database_is_down_and_every_record_arrives_after(
    test_orch: Orchestrator, records_database: RecordsDatabase
) -> None:
    store, flusher = records_of(test_orch, records_database)
    flusher.flush(60)
    assert_chain_whole(store)  # the schema exists and the buffer is empty before the outage
    steps = [{"id": f"s{i}", "service": "testing", "tool": "echo", "parameters": {"value": i}} for i in range(5)]
    with records_database.outage() as audit_count:
        before = audit_count()
        result = test_orch.enqueue(workflow("outage", steps)).wait(60)
        assert result.status == "succeeded", result.errors
        assert flusher.pending() > 0  # the run's records wait in Redis
        assert audit_count() == before
        with pytest.raises(RecordsError):
            Flusher(test_orch.connect().redis, test_orch.connect().namespace, RecordStore(records_database.url),
                    lock_ttl=5).flush(10)  # fmt: skip
    flusher.flush(120)
    assert_records_match(store, result)
    assert assert_chain_whole(store) >= before + 1 + len(steps)


def test_two_worker_processes_writing_at_once_keep_one_chain(
    redis_url: str,
    test_orch: Orchestrator,
    workers: WorkerProcesses,
    records_database: RecordsDatabase,
    tmp_path: Path,
) -> None:
    store, flusher = records_of(test_orch, records_database)
    config = yaml.safe_load(TEST_SERVICES.read_text())
    config["servers"]["testing"]["args"] = [str(ROOT / "tests" / "servers" / "testing.py")]
    config["services"]["twin"] = {"server": "testing"}  # a second queue, so a second process runs half the steps
    path = tmp_path / "twin.yaml"
    path.write_text(yaml.safe_dump(config))
    second = workers.start("twin", config=path)
    try:
        fan = [{"id": f"b{i}", "service": ("testing", "twin")[i % 2], "tool": "sleep", "parameters": {"seconds": 0.05}}
               for i in range(8)]  # fmt: skip
        wide = Workflow.model_validate({"id": "wide", "parallelSteps": [fan]})
        with Orchestrator(load_config(path), redis_url=redis_url) as orch:
            handles = [orch.enqueue(wide) for _ in range(6)]
            results = [handle.wait(120) for handle in handles]
    finally:
        second.terminate()
        second.wait(30)
    assert all(r.status == "succeeded" for r in results), [r.errors for r in results if r.errors]
    hosts = {step.worker for r in results for step in r.steps.values()}
    assert len(hosts) == 2, f"both workers ran steps: {hosts}"
    flusher.flush(60)
    assert_chain_whole(store)
    for result in results:
        assert_records_match(store, result)


APPENDER = """
import sys
from orchestrator.history import events
from orchestrator.history.records import RecordStore
store = RecordStore(sys.argv[1])
for batch in range(int(sys.argv[3])):
    store.apply([events.operation_event("register", who=sys.argv[2], service=f"s{batch}-{n}") for n in range(5)])
"""


def test_two_processes_appending_directly_keep_one_chain(scratch_database: str) -> None:
    """Below the Redis lock: the database's own lock on the chain head serializes appends."""
    RecordStore(scratch_database).upgrade()
    writers = [subprocess.Popen([sys.executable, "-c", APPENDER, scratch_database, name, "40"], cwd=ROOT)
               for name in ("one", "two")]  # fmt: skip
    assert [writer.wait(120) for writer in writers] == [0, 0]
    store = RecordStore(scratch_database)
    assert assert_chain_whole(store) == 2 * 40 * 5
    with store.session() as session:
        whose = session.scalars(select(AuditRecord.who).order_by(AuditRecord.seq)).all()
    assert set(whose) == {"one", "two"}


@pytest.fixture(params=["sqlite", "postgresql"])
def scratch_database(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[str]:
    """An empty records database of each kind: SQLite always, PostgreSQL when DATABASE_URL is set."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'records.db'}"
        return
    import os

    if not os.environ.get("DATABASE_URL"):
        pytest.skip("PostgreSQL: set DATABASE_URL (CI's first pass does)")
    url, drop = scratch_postgres(os.environ["DATABASE_URL"])
    yield url
    drop()


def chain_of(url: str, rows: int = 6) -> RecordStore:
    store = RecordStore(url)
    store.upgrade()
    store.apply([events.operation_event("register", service=f"svc{n}", outcome="ok") for n in range(rows)])
    assert assert_chain_whole(store) == rows
    return store


def tampered(store: RecordStore, *statements: str) -> audit.Problem | None:
    with store.session() as session:
        for statement in statements:
            session.execute(text(statement))
    with store.session() as session:
        return audit.verify(session)[1]


def test_an_edited_row_is_named(scratch_database: str) -> None:
    store = chain_of(scratch_database)
    problem = tampered(store, "update audit set outcome = 'forged' where seq = 3")
    assert problem is not None and problem.seq == 3 and "edited" in problem.reason


def test_a_deleted_row_is_named(scratch_database: str) -> None:
    store = chain_of(scratch_database)
    problem = tampered(store, "delete from audit where seq = 3")
    assert problem is not None and problem.seq == 4 and "row 3 before it missing" in problem.reason


def test_reordered_rows_are_named(scratch_database: str) -> None:
    store = chain_of(scratch_database)
    problem = tampered(store, "update audit set seq = -1 where seq = 3", "update audit set seq = 3 where seq = 4",
                       "update audit set seq = 4 where seq = -1")  # fmt: skip
    assert problem is not None and problem.seq == 3 and "does not follow" in problem.reason


def test_rows_cut_off_the_end_are_named(scratch_database: str) -> None:
    store = chain_of(scratch_database)
    problem = tampered(store, "delete from audit where seq >= 5")
    assert problem is not None and problem.seq == 5 and "rows cut off" in problem.reason


def test_audit_verify_command_names_the_first_bad_row(scratch_database: str, worker_env: dict[str, str]) -> None:
    store = chain_of(scratch_database)
    env = {**worker_env, "DATABASE_URL": scratch_database}
    verify = [sys.executable, "-m", "orchestrator.cli", "audit", "verify"]
    intact = subprocess.run(verify, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert intact.returncode == 0 and "ok: 6 audit rows" in intact.stdout, intact.stderr
    tampered(store, "update audit set who = 'mallory' where seq = 2")
    broken = subprocess.run(verify, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert broken.returncode == 1 and "audit row 2:" in broken.stderr and "edited" in broken.stderr


def test_a_backstop_flusher_leaves_fresh_events_to_others_and_writes_those_left_waiting(
    redis_url: str, tmp_path: Path
) -> None:
    """A worker's flusher (WORKER_BACKSTOP) writes only what no other flusher took in time."""
    namespace = f"test-backstop-{uuid.uuid4().hex[:8]}"
    key = events.buffer_key(namespace)
    store = RecordStore(f"sqlite:///{tmp_path / 'records.db'}")
    store.upgrade()
    with Redis.from_url(redis_url) as redis:
        flusher = Flusher(redis, namespace, store, backstop=2.0)
        fresh = events.operation_event("register", who="tester", service="svc")
        redis.rpush(key, fresh)
        assert flusher.flush_once(flusher.backstop) == 0 and flusher.pending() == 1
        waited = json.loads(fresh)
        waited["at"] -= 2.5
        redis.lset(key, 0, json.dumps(waited))
        assert flusher.flush_once(flusher.backstop) == 1 and flusher.pending() == 0
        redis.delete(key, f"{key}:lock")
    assert assert_chain_whole(store) == 1


def test_an_events_time_is_read_off_its_head() -> None:
    step = events.step_event("run", "step", json.dumps({"output": "x" * 10_000}))
    assert abs(events.recorded_at(step.encode()) - json.loads(step)["at"]) < 1e-6
    assert events.recorded_at(b"not json") == 0.0  # written at once; the flusher logs it and goes on


def test_records_off_pushes_nothing(test_orch: Orchestrator) -> None:
    from orchestrator.runs import RunStore

    quiet = RunStore(test_orch.connect().redis, f"{test_orch.connect().namespace}-off", 60, record=False)
    graph = test_orch.graph(workflow("quiet", [{"service": "testing", "tool": "echo"}]))
    quiet.write("r", quiet.records(graph, "v", {}))
    assert test_orch.connect().redis.llen(events.buffer_key(quiet.namespace)) == 0


def test_secret_looking_params_are_redacted_at_any_depth() -> None:
    params = {"env": "prod", "DB_Password": "p", "nested": {"Authorization": "Bearer x", "items": [{"apiKey": "k"}]}}
    assert events.redact(params) == {
        "env": "prod", "DB_Password": "[redacted]",
        "nested": {"Authorization": "[redacted]", "items": [{"apiKey": "[redacted]"}]},
    }  # fmt: skip
