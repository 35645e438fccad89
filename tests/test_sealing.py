"""Sealing of sensitive data (orchestrator/security/sealing.py) and the redacting log filter
(orchestrator/security/redaction.py)."""

from __future__ import annotations

import io
import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from orchestrator import Workflow, load_config
from orchestrator.compiler import step_call
from orchestrator.errors import SealedDataUnreadable
from orchestrator.results import AttemptError, RunResult, StepError, StepResult
from orchestrator.security import redaction, sealing
from orchestrator.security.sealing import PREFIX, Sealer, is_sealed, open_run, seal_errors, seal_result
from orchestrator.security.vault import KeyRing
from orchestrator.workflow import plan

from .conftest import TEST_SERVICES


def canary() -> str:
    return f"canary-{uuid.uuid4().hex}"


def test_a_sealed_value_holds_no_plaintext_and_opens_to_the_value() -> None:
    sealer = Sealer(KeyRing(keys=[Fernet.generate_key()]))
    value = {"pin": canary(), "n": [1, 2]}
    sealed = sealer.seal(value)
    assert is_sealed(sealed) and sealed.startswith(PREFIX)
    assert value["pin"] not in sealed and value["pin"].encode().hex() not in sealed
    assert sealer.open(sealed) == value
    assert sealer.seal(sealed) == sealed  # sealing twice changes nothing
    assert sealer.open({"plain": 1}) == {"plain": 1}


def test_a_foreign_or_missing_ring_cannot_open_and_says_so_without_the_value(tmp_path: Path) -> None:
    value = canary()
    sealed = Sealer(KeyRing(keys=[Fernet.generate_key()])).seal(value)
    with pytest.raises(SealedDataUnreadable, match="does not open under the data key ring") as caught:
        Sealer(KeyRing(keys=[Fernet.generate_key()])).open(sealed)
    assert value not in str(caught.value)
    with pytest.raises(SealedDataUnreadable, match="no data key ring for sensitive data: set MCPO_DATA_KEYS"):
        Sealer(KeyRing(path=tmp_path / "absent.keys")).open(sealed)


def test_the_digest_of_sensitive_arguments_is_keyed() -> None:
    first, second = Sealer(KeyRing(keys=[Fernet.generate_key()])), Sealer(KeyRing(keys=[Fernet.generate_key()]))
    arguments = {"pin": "1234"}
    assert first.digest(arguments) == first.digest(dict(arguments))
    assert first.digest(arguments) != second.digest(arguments)


@pytest.fixture
def data_keys(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process's sealer on a ring of its own, given in the environment."""
    monkeypatch.setenv("MCPO_DATA_KEYS", Fernet.generate_key().decode())
    sealing.reset()
    yield
    sealing.reset()


@pytest.mark.usefixtures("data_keys")
def test_a_step_result_and_a_run_are_sealed_and_opened_whole() -> None:
    value = canary()
    attempt = AttemptError(attempt=1, service="s", instance="i", type="ToolError", message=f"bad {value}", at=0.0)
    step = StepResult(service="s", tool="t", status="failed", output={"v": value}, error=f"no {value}",
                      attempt_errors=[attempt])  # fmt: skip
    sealed = seal_result(step)
    assert value not in sealed.model_dump_json()
    errors = seal_errors([StepError(step="a", service="s", tool="t", type="ToolError", message=value)])
    run = RunResult(id="r", workflow="w", steps={"a": sealed}, errors=errors, params={"pin": sealed.output})
    assert value not in run.model_dump_json()
    opened = open_run(run)
    assert opened.steps["a"] == step and opened.errors[0].message == value and opened.params["pin"] == {"v": value}


def workflow(**fields: object) -> Workflow:
    steps = [
        {"id": "a", "service": "testing", "tool": "echo", "parameters": {"value": "${ params.pin }"}, "depends_on": []},
        {"id": "b", "service": "testing", "tool": "echo", "parameters": {"value": "${ steps.a.output }"},
         "depends_on": ["a"]},
        {"id": "c", "service": "testing", "tool": "echo", "parameters": {"value": "plain"}, "depends_on": []},
    ]  # fmt: skip
    return Workflow.model_validate({"id": "w", "steps": steps, **fields})


def test_a_step_that_reads_a_sensitive_output_is_sensitive_too() -> None:
    graph = plan(workflow(), "w")
    assert not graph.sensitive
    marked = workflow()
    marked.steps[0].sensitive = True
    graph = plan(marked, "w")
    assert {s.id: s.sensitive for s in graph.steps} == {"a": True, "b": True, "c": False} and graph.sensitive
    everything = plan(workflow(sensitive=True), "w")
    assert all(step.sensitive for step in everything.steps)


def test_a_sensitive_step_message_carries_sealed_arguments_and_shows_none() -> None:
    config = load_config(TEST_SERVICES)
    value = canary()
    definition = Workflow.model_validate({"steps": [
        {"service": "testing", "tool": "echo", "parameters": {"value": value}, "sensitive": True,
         "fallback": "testing"}]})  # fmt: skip
    graph = config.graph(definition, "w")
    call = step_call("run", graph.steps[0], opens=graph.sensitive)
    message = json.dumps(call.message())
    assert value not in message and call.sensitive and call.opens
    assert call.shown() == "run=run step=echo arguments=[sealed]"
    plain = step_call("run", config.graph(workflow(), "w").steps[2])
    assert "sensitive" not in plain.message() and "opens" not in plain.message()


@pytest.fixture
def captured() -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger(f"redaction-test-{uuid.uuid4().hex}")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.addHandler(handler)
    redaction.install(logger)
    return logger, stream


def test_the_log_filter_redacts_known_secrets_headers_tokens_and_tracebacks(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = captured
    secret, bearer = canary(), canary()
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXNpZ25hdHVyZQ"
    redaction.remember(secret)
    logger.debug("sending %s to %s", {"value": secret}, "server")
    logger.debug("headers: {'Authorization': 'Bearer %s', 'Cookie': 'session=%s'}", bearer, bearer)
    logger.info("raw header tuple (b'authorization', b'Basic %s')", bearer)
    logger.warning("token %s", jwt)
    logger.debug("Authorization: Bearer %s", bearer)
    try:
        raise ValueError(f"rejected {secret}")
    except ValueError:
        logger.exception("call failed")
    logger.info("an ordinary line")
    text = stream.getvalue()
    for value in (secret, bearer, jwt):
        assert value not in text
    assert "'Authorization': '[redacted]'" in text and "Authorization: [redacted]" in text
    assert "ValueError: rejected [redacted]" in text
    assert "Traceback" in text and "an ordinary line" in text and text.count("[redacted]") >= 6
