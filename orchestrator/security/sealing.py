"""End-to-end sealing of sensitive data: what a `sensitive` step or workflow sends and gets back travels and
rests as Fernet ciphertext, under a data key ring that Redis and the records database never see.

The enqueuing process seals a sensitive step's arguments (and the run's params); the worker opens what it
reads, calls the tool, and seals the step's output and error messages before they reach the run store, so
task messages, run state, the result backend, Flower and the SQL records hold only ciphertext. Readers
holding the ring (the API's `status`, `Run.wait`, the CLI) open it again.

A sealed value is one string, `PREFIX` followed by a Fernet token of the value's JSON: it fits any field
(an output, an error message, the arguments of a message) without changing the shapes around it.

The ring: MCPO_DATA_KEYS (comma-separated Fernet keys, newest first), else the key file MCPO_DATA_KEY_FILE
(default `<MCPO_HOME>/data.keys`, mode 0600, created by the first enqueue of sensitive data). Every worker
and every reader needs the same ring.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from pydantic_settings import BaseSettings, SettingsConfigDict

from orchestrator.errors import KeyRingMissing, SealedDataUnreadable
from orchestrator.history.events import canonical
from orchestrator.messages import SHOWN
from orchestrator.results import RunResult, StepError, StepResult
from orchestrator.security import redaction
from orchestrator.security.vault import KeyRing
from orchestrator.settings import settings

PREFIX = "mcpo-sealed:v1:"


class SealingSettings(BaseSettings):
    """Where the data key ring comes from: MCPO_DATA_KEYS (comma-separated, newest first) or MCPO_DATA_KEY_FILE."""

    model_config = SettingsConfigDict(env_prefix="MCPO_DATA_", extra="ignore")
    keys: str | None = None
    key_file: Path | None = None


def data_ring() -> KeyRing:
    sealing = SealingSettings()
    keys = [key.strip().encode() for key in sealing.keys.split(",") if key.strip()] if sealing.keys else None
    return KeyRing(keys or None, sealing.key_file or settings.home / "data.keys")


def is_sealed(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


class Sealer:
    """Seals and opens values under the data key ring; the ring is read on first use and re-read once when a
    token does not open (a new key may have been put first since)."""

    def __init__(self, ring: KeyRing) -> None:
        self.ring = ring
        self._fernet: MultiFernet | None = None

    def seal(self, value: Any) -> str:
        """The value as one sealed string; a sealed value stays as it is."""
        if is_sealed(value):
            return str(value)
        return PREFIX + self._ring().encrypt(canonical(value).encode()).decode()

    def open(self, value: Any) -> Any:
        """The plaintext of a sealed value; any other value as it is. Every string it held is remembered for
        redaction: the process now holds it, and no log line may show it."""
        if not is_sealed(value):
            return value
        token = value[len(PREFIX) :].encode()
        try:
            text = self._ring().decrypt(token)
        except InvalidToken:
            try:
                text = self._reload().decrypt(token)
            except InvalidToken:
                raise SealedDataUnreadable(
                    f"sealed data does not open under the data key ring ({self.ring.source}): every process of the "
                    "fleet needs the same MCPO_DATA_KEYS or data key file"
                ) from None
        plain = json.loads(text)
        redaction.remember_all(plain)
        return plain

    def digest(self, value: Any) -> str:
        """A keyed digest (HMAC-SHA256 under a key derived from the newest data key) of a value's canonical JSON:
        like the audit's sha256, it proves what was sent, but cannot be searched for a guessed value."""
        key = hashlib.sha256(b"mcpo-digest:" + self._keys()[0]).digest()
        return hmac.new(key, canonical(value).encode(), hashlib.sha256).hexdigest()

    def _ring(self) -> MultiFernet:
        return self._fernet or self._reload()

    def _reload(self) -> MultiFernet:
        self._fernet = MultiFernet([Fernet(key) for key in self._keys()])
        return self._fernet

    def _keys(self) -> list[bytes]:
        try:
            return self.ring.load()
        except KeyRingMissing:
            raise SealedDataUnreadable(
                f"no data key ring for sensitive data: set MCPO_DATA_KEYS or create the key file {self.ring.path} "
                "(the first enqueue of a sensitive workflow creates it)"
            ) from None


_current: Sealer | None = None
_lock = threading.Lock()


def sealer(create: bool = False) -> Sealer:
    """This process's sealer. `create`: make the key file when there is no ring at all — the enqueuing side only,
    since a worker that made a key of its own could open nothing the fleet sealed."""
    global _current
    with _lock:
        if _current is None:
            _current = Sealer(data_ring())
        if create:
            _current.ring.ensure()
        return _current


def reset() -> None:
    """Forget this process's sealer (its ring settings changed)."""
    global _current
    with _lock:
        _current = None


def seal_result(result: StepResult) -> StepResult:
    """A sensitive step's record with its output, error and attempt errors sealed."""
    seal = sealer().seal
    return result.model_copy(
        update={
            "output": None if result.output is None else seal(result.output),
            "error": None if result.error is None else seal(result.error),
            "attempt_errors": [e.model_copy(update={"message": seal(e.message)}) for e in result.attempt_errors],
        }
    )


def open_result(result: StepResult) -> StepResult:
    return _mapped_step(result, sealer().open) if _sealed_step(result) else result


def seal_errors(errors: list[StepError]) -> list[StepError]:
    seal = sealer().seal
    return [error.model_copy(update={"message": seal(error.message)}) for error in errors]


def open_run(run: RunResult) -> RunResult:
    """The run as a reader with the ring sees it: everything sealed opened."""
    return _mapped_run(run, sealer().open) if holds_sealed(run) else run


def hide_run(run: RunResult) -> RunResult:
    """The run as a terminal shows it unless asked to reveal it: everything sealed shown as `[sealed]`."""
    return _mapped_run(run, lambda value: SHOWN if is_sealed(value) else value) if holds_sealed(run) else run


def holds_sealed(run: RunResult) -> bool:
    """Whether anything of the run is sealed (revealing it then needs the `reveal` permission)."""
    sealed = is_sealed(run.output) or any(is_sealed(e.message) for e in run.errors)
    return sealed or any(is_sealed(v) for v in run.params.values()) or any(map(_sealed_step, run.steps.values()))


def _mapped_run(run: RunResult, change: Callable[[Any], Any]) -> RunResult:
    return run.model_copy(
        update={
            "params": {k: change(v) for k, v in run.params.items()},
            "output": change(run.output),
            "errors": [e.model_copy(update={"message": change(e.message)}) for e in run.errors],
            "steps": {sid: _mapped_step(step, change) for sid, step in run.steps.items()},
        }
    )


def _mapped_step(result: StepResult, change: Callable[[Any], Any]) -> StepResult:
    return result.model_copy(
        update={
            "output": change(result.output),
            "error": change(result.error),
            "attempt_errors": [e.model_copy(update={"message": change(e.message)}) for e in result.attempt_errors],
        }
    )


def seal_params(params: dict[str, Any]) -> dict[str, Any]:
    """A sensitive run's params, each value sealed: the keys stay readable (the records redact by key)."""
    seal = sealer(create=True).seal
    return {key: seal(value) for key, value in params.items()}


def open_params(params: dict[str, Any]) -> dict[str, Any]:
    if not any(is_sealed(value) for value in params.values()):
        return params
    opener = sealer().open
    return {key: opener(value) for key, value in params.items()}


def _sealed_step(step: StepResult) -> bool:
    return is_sealed(step.output) or is_sealed(step.error) or any(is_sealed(e.message) for e in step.attempt_errors)
