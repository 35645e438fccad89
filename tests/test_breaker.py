"""The Redis circuit breaker: its state machine against a reference model (hypothesis, fakeredis), and
its atomicity when many processes hammer one breaker on the real Redis."""

from __future__ import annotations

import multiprocessing
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.synchronize import Barrier

import fakeredis
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis import Redis
from redis.exceptions import ResponseError

from orchestrator import scripts
from orchestrator.breaker import BreakerSettings, CircuitBreaker, Permit

SETTINGS = BreakerSettings(window_size=5, minimum_calls=3, failure_rate_threshold=50, slow_call_duration=1.0,
                           slow_call_rate_threshold=80, wait_in_open=10, permitted_calls_in_half_open=2)  # fmt: skip


@dataclass
class Model:
    """resilience4j's count-based breaker, written plainly: the reference the Lua scripts must match."""

    s: BreakerSettings
    state: str = "closed"
    gen: int = 0
    window: list[tuple[bool, bool]] = field(default_factory=list)
    open_until: float = 0.0
    trials: int = 0
    half_open_since: float = 0.0
    trial_outcomes: list[tuple[bool, bool]] = field(default_factory=list)

    def acquire(self, now: float) -> tuple[bool, str, int]:
        if self.state == "open":
            if now < self.open_until:
                return False, "open", self.gen
            self.state, self.gen, self.trials, self.trial_outcomes = "half_open", self.gen + 1, 0, []
            self.half_open_since = now
        if self.state == "half_open":
            if self.trials >= self.s.permitted_calls_in_half_open:
                if now < self.half_open_since + self.s.wait_in_open:
                    return False, "half_open", self.gen
                self.gen, self.trials, self.trial_outcomes, self.half_open_since = self.gen + 1, 0, [], now
            self.trials += 1
        return True, self.state, self.gen

    def _over(self, outcomes: list[tuple[bool, bool]]) -> bool:
        n = len(outcomes)
        fails = sum(f for f, _ in outcomes)
        slows = sum(s for _, s in outcomes)
        return fails * 100 >= self.s.failure_rate_threshold * n or slows * 100 >= self.s.slow_call_rate_threshold * n

    def _move(self, to: str, now: float) -> None:
        self.state, self.gen, self.window = to, self.gen + 1, []
        if to == "open":
            self.open_until = now + self.s.wait_in_open

    def record(self, gen: int, failed: bool, duration: float, now: float) -> str:
        if gen != self.gen:
            return self.state
        outcome = (failed, duration >= self.s.slow_call_duration)
        if self.state == "closed":
            self.window = [*self.window, outcome][-self.s.window_size :]
            if len(self.window) >= self.s.minimum_calls and self._over(self.window):
                self._move("open", now)
        elif self.state == "half_open":
            self.trial_outcomes.append(outcome)
            if len(self.trial_outcomes) >= self.s.permitted_calls_in_half_open:
                self._move("open" if self._over(self.trial_outcomes) else "closed", now)
        return self.state

    def give_back(self, gen: int, asked_in: str) -> None:
        if asked_in == "half_open" and self.state == "half_open" and gen == self.gen and self.trials > 0:
            self.trials -= 1


operations = st.lists(
    st.one_of(
        st.tuples(st.just("acquire"), st.floats(0, 6)),  # time passes, then a call asks
        st.tuples(st.just("record"), st.booleans(), st.sampled_from([0.1, 2.0])),  # an outstanding call ends
        st.tuples(st.just("lose")),  # an outstanding call never reports: its worker died
        st.tuples(st.just("give back")),  # an outstanding call is not made after all: its step was skipped
    ),
    max_size=60,
)


@pytest.fixture(params=["fakeredis", "redis"])
def client(request: pytest.FixtureRequest, redis_url: str) -> Iterator[Redis]:
    """The scripts run on fakeredis (fast) and on the real server (the one that counts)."""
    yield fakeredis.FakeRedis() if request.param == "fakeredis" else Redis.from_url(redis_url)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations)
def test_lua_breaker_matches_the_reference_model(client: Redis, ops: list[tuple]) -> None:  # type: ignore[type-arg]
    key = f"test-breaker-model-{uuid.uuid4().hex}"
    breaker = CircuitBreaker(client, key, SETTINGS)
    model = Model(SETTINGS)
    now = 1000.0
    outstanding: list[tuple[Permit, int]] = []
    for op in ops:
        if op[0] == "acquire":
            now += op[1]
            permit = breaker.acquire(now)
            expected = model.acquire(now)
            assert (permit.allowed, permit.state, permit.generation) == expected
            if permit.allowed:
                outstanding.append((permit, expected[2]))
        elif op[0] == "lose" and outstanding:
            outstanding.pop(0)
        elif op[0] == "give back" and outstanding:
            permit, gen = outstanding.pop(0)
            breaker.give_back(permit)
            model.give_back(gen, permit.state)
        elif outstanding:
            permit, gen = outstanding.pop(0)
            assert breaker.record(permit, op[1], op[2], now) == model.record(gen, op[1], op[2], now)
    snapshot = breaker.snapshot()
    breaker.reset()
    assert snapshot.state == model.state
    if model.state == "closed" and model.window:
        assert snapshot.calls == len(model.window)
        assert snapshot.failure_rate == pytest.approx(100 * sum(f for f, _ in model.window) / len(model.window))


def test_opens_at_the_failure_rate_and_refuses_until_the_wait_is_over() -> None:
    breaker = CircuitBreaker(fakeredis.FakeRedis(), "b", SETTINGS)
    for failed in (False, True, True):
        breaker.record(breaker.acquire(100.0), failed, 0.1, 100.0)
    refused = breaker.acquire(105.0)
    assert (refused.allowed, refused.state, refused.retry_at) == (False, "open", 110.0)
    trial = breaker.acquire(110.0)
    assert (trial.allowed, trial.state) == (True, "half_open")


def test_slow_calls_open_it_at_their_own_threshold() -> None:
    breaker = CircuitBreaker(fakeredis.FakeRedis(), "b", SETTINGS)
    states = [breaker.record(breaker.acquire(1.0), False, 2.0, 1.0) for _ in range(3)]
    assert states == ["closed", "closed", "open"]


def test_outcome_from_before_a_transition_is_ignored() -> None:
    breaker = CircuitBreaker(fakeredis.FakeRedis(), "b", SETTINGS)
    early = breaker.acquire(1.0)
    for _ in range(3):
        breaker.record(breaker.acquire(1.0), True, 0.1, 1.0)
    assert breaker.snapshot().state == "open"
    assert breaker.record(early, False, 0.1, 2.0) == "open"


def _hammer(url: str, key: str, ready: Barrier, results: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    # A long wait: trials that have not reported give way only after it, long after this test.
    redis = Redis.from_url(url)
    breaker = CircuitBreaker(redis, key, BreakerSettings(permitted_calls_in_half_open=3, wait_in_open=60))
    redis.ping()  # connected before the race
    # Every process asks at once, as soon as the last one is ready: the ones that started first sleep meanwhile
    # rather than spin on the two cores the others still need to start.
    ready.wait(60)
    granted = sum(breaker.acquire().allowed for _ in range(200))
    results.put((os.getpid(), granted))


def test_half_open_trials_never_exceed_the_permits_across_processes(redis_url: str) -> None:
    key = f"test-breaker-{os.getpid()}-{time.time_ns()}"
    redis = Redis.from_url(redis_url)
    breaker = CircuitBreaker(redis, key, BreakerSettings(permitted_calls_in_half_open=3, wait_in_open=0.5,
                                                         minimum_calls=1, window_size=1))  # fmt: skip
    breaker.record(breaker.acquire(), True, 0.1)  # one failure opens it
    assert breaker.snapshot().state == "open"
    time.sleep(0.6)  # the wait is over: the next asks race for the half-open trials
    spawn = multiprocessing.get_context("spawn")  # not fork: this process has threads holding locks
    results = spawn.Queue()
    ready = spawn.Barrier(8)
    processes = [spawn.Process(target=_hammer, args=(redis_url, key, ready, results)) for _ in range(8)]
    for process in processes:
        process.start()
    granted = [results.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(10)
    assert sum(count for _, count in granted) == 3
    assert breaker.snapshot().state == "half_open"
    redis.delete(key, f"{key}:window")


def test_trials_that_never_report_give_way_after_a_wait() -> None:
    breaker = CircuitBreaker(fakeredis.FakeRedis(), "b", SETTINGS)
    for _ in range(3):
        breaker.record(breaker.acquire(1000.0), True, 0.1, 1000.0)
    lost = [breaker.acquire(1010.0) for _ in range(2)]  # both trials' workers die: nothing is recorded
    assert [p.allowed for p in lost] == [True, True] and not breaker.acquire(1015.0).allowed
    retried = breaker.acquire(1020.0)
    assert (retried.allowed, retried.state) == (True, "half_open") and retried.generation > lost[0].generation
    assert breaker.record(lost[0], False, 0.1, 1020.0) == "half_open"  # a late report of a lost trial is ignored


def test_a_trial_given_back_lets_another_call_try() -> None:
    breaker = CircuitBreaker(fakeredis.FakeRedis(), "b", SETTINGS)
    for _ in range(3):
        breaker.record(breaker.acquire(1000.0), True, 0.1, 1000.0)
    trials = [breaker.acquire(1010.0) for _ in range(2)]
    assert all(p.allowed and p.state == "half_open" for p in trials) and not breaker.acquire(1011.0).allowed
    breaker.give_back(trials[0])  # its step was skipped: the call was never made
    assert breaker.acquire(1012.0).allowed and not breaker.acquire(1013.0).allowed
    breaker.give_back(trials[1])
    assert breaker.acquire(1014.0).allowed  # given back before anything else came of it
    later = [breaker.acquire(1030.0) for _ in range(2)]  # the trials above never reported: new ones go
    assert all(p.allowed and p.generation > trials[1].generation for p in later)
    breaker.give_back(trials[1])  # from an older generation: frees nothing
    assert not breaker.acquire(1031.0).allowed


def test_a_pipeline_resends_only_the_scripts_a_server_lost(client: Redis) -> None:
    key = f"test-breaker-pipe-{uuid.uuid4().hex}"
    breaker = CircuitBreaker(client, key, SETTINGS)
    breaker.acquire()  # loads the scripts
    client.script_flush()  # as a restarted server would be
    pipe = client.pipeline(transaction=False)
    breaker.ask(pipe)
    pipe.incr(f"{key}:counter")
    replies = scripts.execute(pipe)
    assert CircuitBreaker.permit(replies[0]).allowed and replies[1] == 1  # the counter went up once, not twice
    pipe = client.pipeline(transaction=False)
    pipe.lpush(f"{key}:counter", "x")  # a wrong type: other errors still raise
    with pytest.raises(ResponseError):
        scripts.execute(pipe)
    breaker.reset()
    client.delete(f"{key}:counter")


def test_health_beats_feed_the_breaker() -> None:
    breaker = CircuitBreaker(fakeredis.FakeRedis(), "b", SETTINGS)
    assert breaker.beat(True, now=100) == "closed" and breaker.snapshot().calls == 0  # passing beats add nothing
    breaker.record(breaker.acquire(now=100), False, 0.1, now=100)
    assert breaker.beat(False, now=101) == "closed"  # one failure of two calls: under the minimum of three
    assert breaker.beat(False, now=102) == "open"  # a failed beat counts as a failed call
    assert breaker.beat(False, now=103) == "open" and not breaker.acquire(now=104).allowed  # nothing while open
    assert breaker.beat(True, now=105) == "half_open"  # the server answers again: trials may go now, not at 112
    trial = breaker.acquire(now=105)
    assert trial.allowed and trial.state == "half_open"
    assert breaker.beat(False, now=106) == "half_open"  # a failed trial of the two permitted
    assert breaker.record(trial, True, 0.1, now=106) == "open"  # both failed: open again
