"""Request batching: the calls of a parallel group sent as a few messages, each call still its own step — split
over the workers that serve the queue, retries and fallbacks that leave their batch, and a worker killed mid-batch —
on real worker processes, a real Redis and real MCP servers."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from celery.canvas import _chain, _chord

from orchestrator import ConfigError, Workflow, load_config
from orchestrator.batching import Batching
from orchestrator.compiler import compile_run
from orchestrator.config import BatchSettings

from .conftest import SERVERS, worker_fleet

HEARTBEAT = {"MCPO_HEARTBEAT_INTERVAL": "0.5"}  # a killed worker's batch is put back within 1.5 s


def configuration(path: Path, batch: Any = None) -> Path:
    server = {"command": "python", "args": [str(SERVERS / "testing.py")]}
    batched: dict[str, Any] = {"server": "t", "retries": 1, "timeout": 30}
    if batch is not None:
        batched["batch"] = batch
    services = {"batched": batched, "understudy": {"server": "t", "retries": 0}}
    path.write_text(yaml.safe_dump({"servers": {"t": server}, "services": services}))
    return path


def fan_out(steps: list[dict[str, Any]]) -> Workflow:
    return Workflow.model_validate({"id": "fan", "steps": [{"depends_on": [], **step} for step in steps]})


def tallies(ledger: Path, count: int, seconds: float = 0.0, prefix: str = "t") -> list[dict[str, Any]]:
    return [{"id": f"{prefix}{i}", "service": "batched", "tool": "tally",
             "parameters": {"path": str(ledger), "tag": f"{prefix}{i}", "seconds": seconds}}
            for i in range(count)]  # fmt: skip


def lines(ledger: Path) -> Counter[str]:
    return Counter(ledger.read_text().split() if ledger.exists() else [])


def header(canvas: Any) -> list[Any]:
    """The header of the chord a fan-out's canvas is (its group, then the run's finish)."""
    assert isinstance(canvas, _chord), canvas
    return list(canvas.tasks)


def test_a_group_is_split_into_batches_of_at_most_max_calls_and_at_least_one_per_worker() -> None:
    plan = Batching({"s": BatchSettings()}, lambda service: 2)
    assert plan.sizes("s", 15) == []  # below min_group: one message per call
    assert plan.sizes("s", 16) == [8, 8]  # two workers: two batches, though one would hold them all
    assert plan.sizes("s", 1000) == [63] * 8 + [62] * 8  # 16 batches of at most 64
    assert plan.sizes("other", 100) == []  # a service that does not batch
    assert Batching({"s": BatchSettings()}, lambda service: 3).sizes("s", 40) == [14, 13, 13]
    assert Batching({"s": BatchSettings()}, lambda service: None).sizes("s", 40) == [20, 20]  # not known: two
    assert Batching({"s": BatchSettings()}, lambda service: 50).sizes("s", 20) == [1] * 20  # a call per worker
    assert Batching({"s": BatchSettings(max_calls=4, min_group=2)}, lambda service: 1).sizes("s", 9) == [3, 3, 3]


def test_the_compiler_batches_chord_headers_only(tmp_path: Path) -> None:
    config = load_config(configuration(tmp_path / "c.yaml"))
    plan = Batching.of(config, lambda service: 2)
    ledger = tmp_path / "ledger"
    spare = [{"id": f"x{i}", "service": "understudy", "tool": "echo", "parameters": {}} for i in range(3)]
    graph = config.graph(fan_out(tallies(ledger, 40) + spare), "fan")
    members = header(compile_run("r", graph, caller="token", batching=plan))
    batches = [member for member in members if member.task == "mcpo.batch"]
    assert [member.kwargs["service"] for member in members if member.task == "mcpo.call"] == ["understudy"] * 3
    assert [batch.options["shadow"] for batch in batches] == ["batched.tally \N{MULTIPLICATION SIGN}20"] * 2
    assert batches[0].options["kwargsrepr"] == "run=r steps=" + ",".join(f"t{i}" for i in range(20))
    assert batches[0].kwargs["caller"] == "token" and all("caller" not in call for call in batches[0].kwargs["calls"])
    assert [call["step_id"] for batch in batches for call in batch.kwargs["calls"]] == [f"t{i}" for i in range(40)]
    # Without batching, or with `batch: false`, every call is a message of its own.
    assert all(member.task == "mcpo.call" for member in header(compile_run("r", graph)))
    off = load_config(configuration(tmp_path / "off.yaml", batch=False))
    assert all(m.task == "mcpo.call" for m in header(compile_run("r", graph, batching=Batching.of(off, lambda s: 2))))
    # A group that ends a chain inside another group is joined by Celery, not counted by a chord: not batched.
    nested = [{"id": "a", "service": "understudy", "tool": "echo", "parameters": {}}]
    nested += [{**step, "depends_on": ["a"]} for step in tallies(ledger, 20)]
    nested += [{"id": "z", "service": "understudy", "tool": "echo", "parameters": {}}]
    canvas = compile_run("r", config.graph(fan_out(nested), "fan"), batching=plan)
    inner = next(member for member in header(canvas) if isinstance(member, _chain))
    assert [member.task for member in inner.tasks[-1].tasks] == ["mcpo.call"] * 20


def test_bad_batch_settings_are_refused_at_load(tmp_path: Path) -> None:
    for batch, message in [
        ({"max_calls": 1}, "field 'services.batched.batch.max_calls'"),
        ({"min_group": 0}, "field 'services.batched.batch.min_group'"),
        ({"size": 3}, "services.batched.batch.size"),
    ]:
        path = configuration(tmp_path / "bad.yaml", batch)
        with pytest.raises(ConfigError) as caught:
            load_config(path)
        assert str(caught.value).startswith(f"{path}: ") and message in str(caught.value), str(caught.value)


def test_a_fan_out_is_shared_by_both_workers_and_each_call_is_its_own_step(
    worker_env: dict[str, str], redis_url: str, tmp_path: Path
) -> None:
    config = configuration(tmp_path / "c.yaml")
    ledger = tmp_path / "ledger"
    with worker_fleet(redis_url, worker_env, tmp_path, redis_url, config=config, service=("batched", "understudy")) as (
        orch,
        _,
    ):
        result = orch.enqueue(fan_out(tallies(ledger, 40, seconds=0.5))).wait(timeout=60)
    assert result.status == "succeeded", result.errors
    assert sorted(result.steps) == sorted(f"t{i}" for i in range(40))
    assert {step.status for step in result.steps.values()} == {"succeeded"}
    assert lines(ledger) == Counter({f"t{i}": 1 for i in range(40)})
    assert len({step.worker for step in result.steps.values()}) == 2  # each worker made some of the calls
    logs = "".join(path.read_text() for path in tmp_path.glob("worker-*.log"))
    received = [line for line in logs.splitlines() if "batched.tally \N{MULTIPLICATION SIGN}20[" in line
                and line.endswith("received")]  # fmt: skip
    assert len(received) == 2, logs  # as Flower and the logs name a batch


def test_calls_that_must_retry_or_fall_back_leave_their_batch_and_the_fan_in_waits_for_them(
    worker_env: dict[str, str], redis_url: str, tmp_path: Path
) -> None:
    config = configuration(tmp_path / "c.yaml")
    ledger = tmp_path / "ledger"
    flaky = [{"id": f"f{i}", "service": "batched", "tool": "flaky", "retry_tool_errors": True,
              "parameters": {"path": str(ledger), "tag": f"f{i}"}} for i in range(12)]  # fmt: skip
    failing = [{"id": f"x{i}", "service": "batched", "tool": "fail", "parameters": {},
                "fallback": {"service": "understudy", "tool": "echo", "parameters": {"value": i}}}
               for i in range(12)]  # fmt: skip
    steps = [*flaky, *failing, {"id": "after", "service": "understudy", "tool": "echo", "parameters": {"value": "end"},
                                "depends_on": [step["id"] for step in flaky + failing]}]  # fmt: skip
    with worker_fleet(redis_url, worker_env, tmp_path, redis_url, config=config, service=("batched", "understudy")) as (
        orch,
        _,
    ):
        result = orch.enqueue(fan_out(steps)).wait(timeout=90)
    logs = "".join(path.read_text() for path in tmp_path.glob("worker-*.log"))
    for tool in ("flaky", "fail"):
        assert f"batched.{tool} \N{MULTIPLICATION SIGN}12[" in logs, logs  # each group of 12 went as one batch
    assert result.status == "succeeded", result.errors
    assert lines(ledger) == Counter({f"f{i}": 2 for i in range(12)})  # each failed once, then succeeded alone
    assert all(result.steps[f"f{i}"].attempts == 2 for i in range(12))
    for i in range(12):
        step = result.steps[f"x{i}"]
        assert (step.status, step.output["value"], step.served_by) == ("succeeded", i, "understudy.echo")
    assert result.steps["after"].status == "succeeded"  # the step after the group started once every call ended
    assert result.steps["after"].started_at >= max(step.finished_at or 0 for step in result.steps.values()
                                                    if step is not result.steps["after"])  # fmt: skip


def test_a_worker_killed_mid_batch_repeats_only_the_calls_not_recorded(
    worker_env: dict[str, str], redis_url: str, tmp_path: Path
) -> None:
    config = configuration(tmp_path / "c.yaml")
    ledger = tmp_path / "ledger"
    steps = [step for pair in zip(tallies(ledger, 16, 0.1, "fast"), tallies(ledger, 16, 8, "slow"), strict=True)
             for step in pair]  # fmt: skip
    env = {**worker_env, **HEARTBEAT}
    with worker_fleet(redis_url, env, tmp_path, redis_url, config=config, service=("batched", "understudy")) as (
        orch,
        workers,
    ):
        run = orch.enqueue(fan_out(steps))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            statuses = {step_id: step.status for step_id, step in orch.status(run.id).steps.items()}
            if all(statuses[f"fast{i}"] == "succeeded" for i in range(16)) and lines(ledger)["slow0"]:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"the fast calls did not all end within 60 s: {statuses}")
        victim = workers.processes[0]
        victim.kill()
        victim.wait(10)
        result = run.wait(timeout=60)
    assert result.status == "succeeded", result.errors
    calls = lines(ledger)
    assert {tag: calls[tag] for tag in calls if tag.startswith("fast")} == {f"fast{i}": 1 for i in range(16)}
    repeated = sorted(tag for tag, count in calls.items() if count == 2)
    assert repeated and all(tag.startswith("slow") for tag in repeated), calls  # the killed worker's slow calls
    assert all(calls[f"slow{i}"] in (1, 2) for i in range(16)), calls
