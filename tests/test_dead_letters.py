"""Dead letters: a record event the database refuses is set aside and the others are written (by a flusher, and by
a worker alone); the `dead-letters` commands list, show, requeue and purge them, under access control."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from redis import Redis

from orchestrator.deadletters import DeadLetter, DeadLetters
from orchestrator.history import audit
from orchestrator.history.events import buffer_key, event, operation_event
from orchestrator.history.flusher import Flusher
from orchestrator.history.records import RecordStore
from orchestrator.security.identity import SigningKey, TokenBook

from .conftest import ROOT, TEST_SERVICES, RecordsDatabase


def _bad_event(postgres: bool) -> str:
    """A run event the database refuses: on PostgreSQL a step id longer than its varchar(200); SQLite stores any
    length, so there a run without a workflow name (a NOT NULL column)."""
    steps = [{"id": "x" * 10_000, "service": "s", "tool": "t"}]
    workflow = "w" if postgres else None
    return event("run", run_id=uuid.uuid4().hex, workflow=workflow, version="v", params={}, who="test",
                 steps=steps, created_at=time.time())  # fmt: skip


def _good_events(count: int) -> list[str]:
    return [operation_event("dead-letter-test", "tester", detail={"n": n}) for n in range(count)]


def _written(store: RecordStore, events: list[str]) -> int:
    with store.session() as session:
        return len(audit.seen(session, [json.loads(raw)["id"] for raw in events]))


@pytest.fixture
def namespace(redis_url: str) -> Iterator[str]:
    """A namespace of the test's own: its buffer and dead letters are touched by no other flusher."""
    name = f"dl-{uuid.uuid4().hex[:8]}"
    yield name
    with Redis.from_url(redis_url) as redis:
        redis.delete(buffer_key(name), f"{name}:dead-letters", f"{name}.parked")


def _drain(redis: Redis, namespace: str, store: RecordStore, events: list[str], batch: int = 500) -> float:
    redis.rpush(buffer_key(namespace), *events)
    flusher = Flusher(redis, namespace, store, batch=batch)
    began = time.perf_counter()
    flusher.flush(120)
    return time.perf_counter() - began


def test_a_refused_record_is_dead_lettered_and_the_others_are_written(
    redis_url: str, namespace: str, records_database: RecordsDatabase
) -> None:
    redis, store = Redis.from_url(redis_url), RecordStore(records_database.url)
    good, bad = _good_events(499), _bad_event(records_database.postgres)
    events = [*good[:250], bad, *good[250:]]
    took = _drain(redis, namespace, store, events)
    letters = DeadLetters(redis, namespace).list()
    assert [letter.body for letter in letters] == [bad.encode()]
    refusal = "DataError" if records_database.postgres else "IntegrityError"
    assert letters[0].kind == "record" and letters[0].reason.startswith(refusal), letters[0].reason
    assert _written(store, good) == 499 and redis.llen(buffer_key(namespace)) == 0
    clean = _drain(redis, f"{namespace}-clean", store, _good_events(500))
    single = _drain(redis, f"{namespace}-single", store, _good_events(500), batch=1)
    print(f"drain 500 events: clean {clean:.2f} s, one refused {took:.2f} s, one at a time {single:.2f} s")
    assert took < single * 2  # halving to the refused event costs far less than writing event by event


def test_a_worker_alone_writes_waiting_records_and_sets_a_refused_one_aside(
    redis_url: str, namespace: str, records_database: RecordsDatabase, tmp_path: Path
) -> None:
    """No enqueuing process is alive: the worker's backstop flusher starts with the worker, not at its first task."""
    redis, store = Redis.from_url(redis_url), RecordStore(records_database.url)
    good, bad = _good_events(20), _bad_event(records_database.postgres)
    redis.rpush(buffer_key(namespace), *good[:10], bad, *good[10:])
    env = {**os.environ, "REDIS_URL": redis_url, "MCPO_NAMESPACE": namespace, "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115
    args = [sys.executable, "-m", "orchestrator.cli", "worker", "--config", str(TEST_SERVICES), "--service", "testing"]
    worker = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while redis.llen(buffer_key(namespace)) and time.monotonic() < deadline:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()
            time.sleep(0.2)
        assert redis.llen(buffer_key(namespace)) == 0, (tmp_path / "worker.log").read_text()
        assert _written(store, good) == 20
        assert [letter.body for letter in DeadLetters(redis, namespace).list()] == [bad.encode()]
    finally:
        worker.terminate()
        worker.wait(30)


# The command: list, show, requeue and purge, each under the permission it needs.


def _cli(namespace: str, redis_url: str, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REDIS_URL": redis_url, "MCPO_NAMESPACE": namespace}
    env.pop("MCPO_TOKEN", None)
    if token:
        env["MCPO_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", "dead-letters", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)  # fmt: skip


def test_list_show_requeue_and_purge(redis_url: str, namespace: str) -> None:
    redis = Redis.from_url(redis_url)
    letters = DeadLetters(redis, namespace)
    record = operation_event("requeued", "tester")
    record_id = letters.add(DeadLetter("record", "DataError: too long", buffer_key(namespace), record.encode()))
    headers = {"task": "mcpo.health", "id": "m1", "probe": "p"}
    envelope = {"content_type": "application/json", "content_encoding": "utf-8", "headers": headers,
                "properties": {"correlation_id": "m1", "delivery_info": {"routing_key": "x"}}}  # fmt: skip
    message_id = letters.add(DeadLetter("message", "bad header", f"{namespace}.parked", b"[[], {}, {}]",
                                        envelope=envelope))  # fmt: skip

    listed = _cli(namespace, redis_url, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [(row["id"], row["kind"]) for row in json.loads(listed.stdout)] == [(record_id, "record"),
                                                                               (message_id, "message")]  # fmt: skip
    table = _cli(namespace, redis_url, "list")
    assert "DataError: too long" in table.stdout and message_id in table.stdout
    shown = json.loads(_cli(namespace, redis_url, "show", message_id).stdout)
    assert shown["body"] == "[[], {}, {}]" and shown["envelope"]["headers"]["probe"] == "p"
    missing = _cli(namespace, redis_url, "show", "1-1")
    assert missing.returncode == 2 and missing.stderr.startswith("error: dead letter 1-1 is not in")
    assert _cli(namespace, redis_url, "show", "nonsense").returncode == 2

    assert _cli(namespace, redis_url, "requeue", record_id).returncode == 0
    assert redis.lrange(buffer_key(namespace), 0, -1) == [record.encode()]
    requeued = _cli(namespace, redis_url, "requeue", message_id)
    assert requeued.returncode == 0, requeued.stderr
    parked = json.loads(redis.lindex(f"{namespace}.parked", 0) or b"{}")  # kombu's envelope on the queue's list
    assert parked["headers"]["probe"] == "p" and parked["properties"]["correlation_id"] == "m1"
    assert letters.count() == 0

    letters.add(DeadLetter("record", "r", "q", b"{}"))
    refused = _cli(namespace, redis_url, "purge")  # no terminal to ask on: --yes is needed
    assert refused.returncode == 2 and "--yes" in refused.stderr and letters.count() == 1
    assert _cli(namespace, redis_url, "purge", "--yes").stdout.strip() == "purged 1 dead letters"
    assert letters.count() == 0


def test_redis_unreachable_is_exit_3(namespace: str) -> None:
    down = _cli(namespace, "redis://127.0.0.1:1/0", "list")
    assert down.returncode == 3 and down.stderr.startswith("error: Redis at 127.0.0.1:1 is not reachable")


def test_access_list_and_show_need_audit_requeue_and_purge_need_admin(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    redis = Redis.from_url(redis_url)
    SigningKey.from_environment().ensure()
    config = tmp_path / "secure.yaml"
    config.write_text(yaml.safe_dump({"access": {"enabled": True, "roles": {
        "auditor": {"permissions": {"audit": ["dead-letters"]}}}}}))  # fmt: skip
    book = TokenBook(redis, namespace)
    tokens = {role: book.issue(f"{role}-user", role, 3600)[0] for role in ("viewer", "auditor", "admin")}
    letter_id = DeadLetters(redis, namespace).add(DeadLetter("record", "r", buffer_key(namespace), b"{}"))

    def code(role: str | None, *args: str) -> int:
        done = _cli(namespace, redis_url, *args, "--config", str(config), token=tokens.get(role or ""))
        assert done.returncode == 0 or done.stderr.strip().splitlines()[-1].startswith("error: "), done.stderr
        return done.returncode

    assert code(None, "list") == 2 and code("viewer", "list") == 2
    assert code("auditor", "list") == 0 and code("auditor", "show", letter_id) == 0
    assert code("auditor", "purge", "--yes") == 2 and code("auditor", "requeue", letter_id) == 2
    assert code("admin", "requeue", letter_id) == 0 and code("admin", "purge", "--yes") == 0
