"""Stale answers: the last good answer to the same call, served when a step that allows it cannot be answered
fresh (`use_stale: SECONDS`, the oldest answer it takes)."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from orchestrator.errors import TransportError, Unavailable
from orchestrator.messages import StepCall
from orchestrator.runs import RunStore
from orchestrator.security.sealing import sealer
from workers.pipeline import SETTLED, Attempt, Decision, Policy


class StaleAnswers(Policy):
    """Remembers each good answer of a step that allows stale ones; serves it when its service is out of reach."""

    options = ("use_stale",)

    def __init__(self, store: RunStore) -> None:
        self.store = store

    def succeeded(self, call: StepCall, attempt: Attempt) -> None:
        if not call.use_stale or call.fallback_for:
            return
        output = attempt.result.output
        key = self._key(call.service, call.tool, attempt.arguments, call.sensitive)
        value = json.dumps({"output": sealer().seal(output) if call.sensitive else output, "at": time.time()})
        self.store.redis.set(key, value, ex=int(call.use_stale) or None)

    def failed(self, call: StepCall, error: Exception, attempt: Attempt) -> Decision | None:
        if not call.use_stale or not isinstance(error, TransportError | Unavailable):
            return None
        original = call.fallback_for or {"service": call.service, "tool": call.tool, "arguments": attempt.arguments}
        stale = self._recall(original, call.use_stale, call.sensitive)
        if stale is None:
            return None
        result = attempt.result
        result.status, result.output, result.stale_age_s = "stale-cache", stale[0], round(stale[1], 3)
        return SETTLED

    def _recall(self, original: dict[str, Any], max_age: float, sensitive: bool) -> tuple[Any, float] | None:
        raw = self.store.redis.get(self._key(original["service"], original["tool"], original["arguments"], sensitive))
        if raw is None:
            return None
        entry = json.loads(raw)
        age = time.time() - float(entry["at"])
        return (entry["output"], age) if age <= max_age else None

    def _key(self, service: str, tool: str, arguments: Any, sensitive: bool) -> str:
        if sensitive:  # a keyed digest: a plain hash of sensitive arguments could be searched for guessed values
            digest = sealer().digest(sealer().open(arguments))
        else:
            digest = hashlib.sha256(json.dumps(arguments, sort_keys=True, default=str).encode()).hexdigest()
        return f"{self.store.namespace}:cache:{service}:{tool}:{digest}"
