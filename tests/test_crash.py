"""A crash counts once: the calls one stdio server process's death fails are one breaker failure, and they are
retried on the restarted process; a breaker refusal of a retry with budget left waits in the broker.

End to end on a real worker, real Redis and real stdio servers (the server process is SIGKILLed mid fan-out),
and the breaker's bookkeeping and the wait policy on their own (fakeredis)."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import yaml
from redis import Redis

from orchestrator import Orchestrator, RunResult, Workflow, load_config
from orchestrator.breaker import BreakerSettings, CircuitBreaker
from orchestrator.errors import CircuitOpen, TransportError
from orchestrator.messages import StepCall
from workers.policies.breaker_wait import wait_out

from .conftest import SERVERS, TEST_SERVICES, WorkerProcesses

WIDTH = 100
# The default breaker but for a window that holds the whole fan-out, so its failure count is read at the end.
CRASHY_BREAKER = {"window_size": 400}
# A breaker that one failure opens, for a short while: the retry of the call that opened it is refused.
BRITTLE_BREAKER = {"window_size": 1, "minimum_calls": 1, "failure_rate_threshold": 50, "wait_in_open": 2,
                   "permitted_calls_in_half_open": 1}  # fmt: skip


@dataclass
class Fleet:
    orch: Orchestrator
    redis: Redis
    home: Path
    crashy: CircuitBreaker
    brittle: CircuitBreaker
    log_dir: Path

    def run(self, steps: list[dict[str, Any]], timeout: float = 120) -> tuple[RunResult, float]:
        began = time.monotonic()
        result = self.orch.enqueue(Workflow.model_validate({"id": "crash", "steps": steps})).wait(timeout)
        return result, time.monotonic() - began

    def crash_marks(self, breaker: CircuitBreaker) -> int:
        return len(self.redis.keys(f"{breaker.key}:crash:*"))


@pytest.fixture(scope="module")
def fleet(redis_url: str, workers: WorkerProcesses, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """One worker serving `crashy` (the testing server) and `brittle` (the faulty server, whose breaker one
    failure opens)."""
    home = tmp_path_factory.mktemp("crash")
    config = yaml.safe_load(TEST_SERVICES.read_text())
    config["servers"] = {
        "crashy": {"command": "python", "args": [str(SERVERS / "testing.py")]},
        "brittle": {"command": "python", "args": [str(SERVERS / "faulty.py")],
                    "env": {"FAULTY_STATE": str(home / "state.json")}},
    }  # fmt: skip
    config["services"] = {
        "crashy": {"server": "crashy", "timeout": 30, "retries": 2, "breaker": CRASHY_BREAKER},
        "brittle": {"server": "brittle", "timeout": 20, "retries": 2, "breaker": BRITTLE_BREAKER},
    }
    path = home / "crash.yaml"
    path.write_text(yaml.safe_dump(config))
    loaded = load_config(path)
    workers.start("crashy", "brittle", config=path, concurrency=WIDTH)
    redis = Redis.from_url(redis_url)
    with Orchestrator(loaded, redis_url=redis_url) as orch:
        namespace = orch.connect().namespace
        yield Fleet(
            orch, redis, home,
            CircuitBreaker.of(redis, namespace, "crashy", "crashy", loaded.services["crashy"].breaker),
            CircuitBreaker.of(redis, namespace, "brittle", "brittle", loaded.services["brittle"].breaker),
            workers.log_dir,
        )  # fmt: skip


def tally(ledger: Path, width: int, seconds: float) -> list[dict[str, Any]]:
    return [
        {"id": f"t{i}", "service": "crashy", "tool": "tally", "depends_on": [],
         "parameters": {"path": str(ledger), "tag": f"t{i}", "seconds": seconds}} for i in range(width)
    ]  # fmt: skip


def server_pid(fleet: Fleet) -> int:
    result, _ = fleet.run([{"id": "pid", "service": "crashy", "tool": "echo"}])
    assert result.status == "succeeded", result.errors
    return int(result.steps["pid"].output["pid"])


def lines(ledger: Path) -> list[str]:
    return ledger.read_text().splitlines() if ledger.exists() else []


def test_a_server_killed_mid_fan_out_counts_once_and_the_run_succeeds(fleet: Fleet) -> None:
    pid = server_pid(fleet)  # the server is up: the calm run's time has no start-up in it either
    calm = fleet.home / "calm.ledger"
    baseline, calm_s = fleet.run(tally(calm, WIDTH, 1.0))
    assert baseline.status == "succeeded", baseline.errors
    fleet.crashy.reset()  # the calm calls out of its window: the crash's failures would be a small share of them
    ledger = fleet.home / "crash.ledger"
    began = time.monotonic()
    run = fleet.orch.enqueue(Workflow.model_validate({"id": "crash", "steps": tally(ledger, WIDTH, 1.0)}))
    deadline = time.monotonic() + 60
    while len(lines(ledger)) < WIDTH // 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)  # mid fan-out: a quarter or more of the calls are in flight on it
    in_flight = len(lines(ledger))
    result = run.wait(120)
    crash_s = time.monotonic() - began

    assert result.status == "succeeded", result.errors
    retried = [s for s in result.steps.values() if s.attempt_errors]
    assert retried and all(s.attempts == 2 for s in retried)
    assert {e.type for s in retried for e in s.attempt_errors} == {"TransportError"}
    counts = Counter(lines(ledger))
    assert set(counts) == {f"t{i}" for i in range(WIDTH)} and max(counts.values()) <= 2
    twice = sum(n - 1 for n in counts.values())
    assert 0 < twice <= min(in_flight, len(retried))  # only calls cut off by the crash were made again
    # One crash, one breaker failure: the breaker never opened, and its window holds a single failure.
    state = {k.decode(): v.decode() for k, v in fleet.redis.hgetall(fleet.crashy.key).items()}
    assert state.get("state", "closed") == "closed" and "opened_at" not in state, state
    assert int(state["fails"]) == 1 and fleet.crash_marks(fleet.crashy) == 1
    # A run enqueued just after the crash is served at once.
    after, _ = fleet.run(tally(fleet.home / "after.ledger", 10, 0.0))
    assert after.status == "succeeded", after.errors
    print(f"\n{WIDTH}-wide fan-out of 1 s calls: {calm_s:.1f} s calm, {crash_s:.1f} s with the server killed "
          f"after {in_flight} calls began; {len(retried)} calls failed by the crash, {twice} made twice")  # fmt: skip


def test_a_refused_call_waits_for_the_breaker_and_succeeds(fleet: Fleet) -> None:
    fleet.brittle.reset()
    state = fleet.home / "state.json"
    state.write_text(json.dumps({"mode": "crash_first", "n": 1}))
    state.with_suffix(".calls").write_text("")
    result, took = fleet.run([{"id": "w", "service": "brittle", "tool": "work", "parameters": {"x": 1}}])
    step = result.steps["w"]
    assert result.status == "succeeded", result.errors
    # The crash opened the breaker; the retry was refused, waited in the broker until the breaker half-opened,
    # and went through as its trial: two calls made, one failed attempt, no refusal recorded as a failure.
    assert step.attempts == 2 and [e.type for e in step.attempt_errors] == ["TransportError"]
    assert len(state.with_suffix(".calls").read_text().splitlines()) == 2
    assert took >= BRITTLE_BREAKER["wait_in_open"] - 0.5
    assert fleet.brittle.snapshot().state == "closed"

    # A fan-out: the calls the crash cut off, and those not made yet, are refused while the breaker is open, then
    # while its one trial runs; each waits in the broker and goes through once the trial has closed it.
    fleet.brittle.reset()
    state.with_suffix(".calls").write_text("")
    steps = [{"id": f"w{i}", "service": "brittle", "tool": "work", "parameters": {"x": i}, "depends_on": []}
             for i in range(10)]  # fmt: skip
    fanned, _ = fleet.run(steps)
    assert fanned.status == "succeeded", fanned.errors
    assert all(s.attempts <= 2 for s in fanned.steps.values())
    assert {e.type for s in fanned.steps.values() for e in s.attempt_errors} <= {"TransportError"}
    logs = "".join(p.read_text(errors="replace") for p in fleet.log_dir.glob("worker-crashy+brittle-*.log"))
    assert "Retry in" in logs


def test_a_first_call_refused_goes_to_the_fallback_at_once(fleet: Fleet) -> None:
    fleet.brittle.reset()
    fleet.brittle.record(fleet.brittle.acquire(), True, 0.1)
    assert fleet.brittle.snapshot().state == "open"
    calls = (fleet.home / "state.json").with_suffix(".calls")
    calls.write_text("")
    fallback = {"service": "crashy", "tool": "echo", "parameters": {"value": "from fallback"}}
    step = {"id": "w", "service": "brittle", "tool": "work", "parameters": {"x": 1}, "fallback": fallback}
    result, took = fleet.run([step])
    assert result.status == "succeeded", result.errors
    served = result.steps["w"]
    assert served.served_by == "crashy.echo" and served.output["value"] == "from fallback"
    assert [e.type for e in served.attempt_errors] == ["CircuitOpen"] and calls.read_text() == ""
    assert took < BRITTLE_BREAKER["wait_in_open"] + 5  # not waited out: the fallback took it


# The bookkeeping and the policy on their own.

FAST = BreakerSettings(window_size=10, minimum_calls=3, failure_rate_threshold=50, wait_in_open=5,
                       permitted_calls_in_half_open=3)  # fmt: skip


def breaker() -> CircuitBreaker:
    return CircuitBreaker(fakeredis.FakeRedis(), "ns:breaker:s:i", FAST)


def test_the_failures_one_session_end_causes_count_once() -> None:
    b = breaker()
    permits = [b.acquire(now=100.0) for _ in range(10)]
    for permit in permits:  # ten calls in flight on one process that dies: one failure
        assert b.record(permit, True, 0.1, now=101.0, session="w1:1") == "closed"
    assert int(b._redis.hget(b.key, "fails") or 0) == 1 and b.snapshot().calls == 1
    for session in ("w1:2", "w2:1"):  # the next process of that worker, and another worker's: one each
        b.record(b.acquire(now=102.0), True, 0.1, now=102.0, session=session)
    assert b.snapshot().state == "open"  # three failures of three: separate crashes still open it


def test_a_crash_in_half_open_is_one_failed_trial_and_frees_the_others() -> None:
    b = breaker()
    for _ in range(3):
        b.record(b.acquire(now=1.0), True, 0.1, now=1.0)
    trials = [b.acquire(now=10.0) for _ in range(3)]
    assert all(t.allowed and t.state == "half_open" for t in trials) and not b.acquire(now=10.0).allowed
    for trial in trials:  # all three trials were on the process that died
        b.record(trial, True, 0.1, now=10.5, session="w1:7")
    # One failed trial; the two others are freed for new trials, which decide.
    again = [b.acquire(now=11.0) for _ in range(2)]
    assert all(t.allowed for t in again)
    for trial in again:
        b.record(trial, False, 0.1, now=11.5)
    assert b.snapshot().state == "closed"


def call(**changes: Any) -> StepCall:
    now = time.time()
    base = StepCall(run_id="r", step_id="s", service="svc", tool="t", arguments={}, timeout=30, retries=2,
                    attempt=1, started_at=now, deadline=now + 30,
                    attempt_errors=[{"attempt": 1, "service": "svc", "instance": "i", "type": "TransportError",
                                     "message": "lost", "at": now}])  # fmt: skip
    return StepCall(**{**base.__dict__, **changes})


def test_a_refused_call_with_budget_is_sent_again_when_the_breaker_half_opens() -> None:
    now = time.time()
    refused = CircuitOpen("circuit breaker for svc/i is open", retry_at=now + 4)
    countdown = wait_out(call(), refused)
    assert countdown is not None and 4 <= countdown <= 5
    trials_busy = CircuitOpen("circuit breaker for svc/i is half_open", retry_at=None)
    countdown = wait_out(call(), trials_busy)
    assert countdown is not None and 0 < countdown <= 2
    first = wait_out(call(attempt=0, attempt_errors=[]), refused)  # a first call of a step that allows retries
    assert first is not None and 4 <= first <= 5
    # Not waited out: a step that allows no retries (the breaker fails it fast), one whose fallback service or stale
    # answer takes it, a call whose time budget ends before the breaker lets it through, and any other error.
    assert wait_out(call(attempt=0, attempt_errors=[], retries=0), refused) is None
    assert wait_out(call(fallback={"service": "other"}), refused) is None
    assert wait_out(call(use_stale=600), refused) is None
    assert wait_out(call(deadline=now + 3), refused) is None
    assert wait_out(call(), TransportError("lost")) is None
