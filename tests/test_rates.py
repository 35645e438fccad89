"""Rate limits per service, per tool and per caller, held across the fleet: the slot script on a real Redis, and
two worker processes under one rate, timed by the server that takes the calls."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
import yaml
from redis import Redis

from orchestrator import Workflow
from orchestrator.concurrency import ServiceLimits
from orchestrator.rates import LATE, Rate, RateLimits, parse_rate

from .conftest import SERVERS, worker_fleet


@pytest.mark.parametrize(("written", "rate"), [("100/s", Rate(100, 1.0)), ("5/m", Rate(5, 60.0)),
                                               (" 7 / h ", Rate(7, 3600.0))])  # fmt: skip
def test_rates_as_written(written: str, rate: Rate) -> None:
    assert parse_rate(written) == rate
    assert str(rate) == written.replace(" ", "")


@pytest.fixture
def rates(redis_url: str) -> RateLimits:
    limits = ServiceLimits.model_validate({"rate": "10/s", "per_caller": "1/m", "tools": {"slow": {"rate": "2/s"}}})
    return RateLimits(Redis.from_url(redis_url), f"rates-{uuid.uuid4().hex[:8]}", {"svc": limits})


def test_the_bounds_of_a_call(rates: RateLimits) -> None:
    assert rates.bounds("other", "slow", "ann") == []
    assert [b.scope for b in rates.bounds("svc", "fast", None)] == ["service svc"]
    assert [b.scope for b in rates.bounds("svc", "slow", "ann")] == ["service svc", "tool svc.slow",
                                                                     "caller ann on service svc"]  # fmt: skip


def test_a_call_over_the_rate_is_given_the_next_slot_and_its_redelivery_takes_it(rates: RateLimits) -> None:
    bounds = rates.bounds("svc", "slow", None)  # 10/s and 2/s: a call every 0.5 s
    assert rates.take(bounds, "a", 10) == 0
    second = rates.take(bounds, "b", 10)
    assert second is not None and 0.4 < second <= 0.5
    third = rates.take(bounds, "c", 10)
    assert third is not None and 0.9 < third <= 1.0  # queued behind b, not racing it for the same slot
    early = rates.take(bounds, "b", 10)  # b's redelivery, too soon: the same slot, not a new one
    assert early is not None and 0 < early <= second
    time.sleep(early)
    assert rates.take(bounds, "b", 10) == 0
    assert (rates.take(bounds, "b", 10) or 0) > 0  # its slot was taken once: another delivery queues again


def test_a_call_too_late_for_its_slot_queues_for_the_next_one(rates: RateLimits) -> None:
    bounds = rates.bounds("svc", "fast", None)  # 10/s: a call every 0.1 s
    assert rates.take(bounds, "a", 10) == 0
    b = rates.take(bounds, "b", 10)
    assert b is not None
    time.sleep(b + LATE + 0.02)  # b's redelivery was held up past its slot
    assert rates.take(bounds, "d", 10) == 0  # a call that comes now goes now
    again = rates.take(bounds, "b", 10)
    assert again is not None and 0 < again <= 0.1  # and b queues behind it, instead of going beside it


def test_a_slot_later_than_the_deadline_is_not_taken(rates: RateLimits) -> None:
    bounds = rates.bounds("svc", "slow", None)
    assert rates.take(bounds, "a", 10) == 0
    assert rates.take(bounds, "b", 0.1) is None  # the next slot is 0.5 s away
    assert 0.4 < (rates.take(bounds, "c", 10) or 0) <= 0.5  # b took nothing: c has the next slot


def test_each_caller_has_a_rate_of_its_own(rates: RateLimits) -> None:
    assert rates.take(rates.bounds("svc", "fast", "ann"), "a", 1) == 0
    assert (rates.take(rates.bounds("svc", "fast", "bob"), "b", 1) or 1) <= 0.1  # the service's 10/s only
    assert rates.take(rates.bounds("svc", "fast", "ann"), "c", 1) is None  # ann's next call: a minute away


# Two worker processes under a rate of 20/s: the server says when each call reached it.

RATE = 20


def test_a_rate_holds_across_two_worker_processes(worker_env: dict[str, str], redis_url: str,
                                                   tmp_path: Path) -> None:  # fmt: skip
    config = tmp_path / "rated.yaml"
    config.write_text(yaml.safe_dump({
        "servers": {"rated": {"command": "python", "args": [str(SERVERS / "testing.py")]}},
        "services": {"rated": {"server": "rated", "timeout": 60, "limits": {"rate": f"{RATE}/s"}}},
    }))  # fmt: skip
    ledger = tmp_path / "stamps"
    calls = 60
    workflow = Workflow.model_validate({"id": "rated", "steps": [
        {"id": f"c{i}", "service": "rated", "tool": "stamp", "parameters": {"path": str(ledger)}, "depends_on": []}
        for i in range(calls)
    ]})  # fmt: skip
    with worker_fleet(redis_url, worker_env, tmp_path, redis_url, config=config, service="rated") as (orch, _):
        result = orch.enqueue(workflow).wait(timeout=120)
    assert result.status == "succeeded", result.errors
    assert all(step.attempts == 1 for step in result.steps.values())  # waiting for a slot is not an attempt
    stamps = sorted(float(line) for line in ledger.read_text().split())
    assert len(stamps) == calls
    assert (calls - 1) / (stamps[-1] - stamps[0]) <= RATE * 1.1  # spaced over the whole run
    # The slots are spaced exactly; the calls reach the server a little unevenly (a pause of a process on the way),
    # so a second may hold one or two more: never a burst of the run's calls.
    busiest = max(sum(1 for t in stamps if start <= t < start + 1) for start in stamps)
    assert busiest <= RATE * 1.25, busiest
