"""Idempotency: a key per MCP call that servers can dedupe on, and a key per request to enqueue that returns the
run an earlier request with the same key started.

Delivery is at least once: a worker that dies mid-call (or a Redis restart) sends the call again. Every call
therefore carries `<run id>:<step id>` in its MCP request's `_meta` under `META_KEY`, the same on every attempt and
every redelivery, so a server whose tool has effects can recognise the repeat.

A caller that retries an enqueue (a timeout, a crash before it saw the run id) passes its own key: the first request
claims it in Redis (one Lua script: read the claim, or set it with a TTL), every later one within `TTL` seconds gets
the run the first started.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis import Redis

from orchestrator.errors import IdempotencyConflict

META_KEY = "io.mcp-orchestrator/idempotency-key"  # in a tools/call request's `_meta`
TTL = 24 * 3600  # seconds an enqueue key keeps answering with its run
MAX_LENGTH = 200  # characters of an enqueue key: what the records' `runs.idempotency_key` holds

CLAIM_WAIT = 30.0  # seconds a repeated request waits for the run of an earlier claim to appear before taking over

# Returns the claim already made for the key, or claims it (and returns nothing): concurrent callers with one key
# get one claim, whichever came first.
_CLAIM = """
local held = redis.call('GET', KEYS[1])
if held then return held end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return false
"""

# Replaces the claim ARGV[1] (whose caller died before starting its run) with ARGV[3]; returns the claim that holds
# the key when it is another (a third caller took over first), nothing once this one holds it.
_TAKE_OVER = """
local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[1] then return held end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return false
"""

# Deletes the claim ARGV[1], and only it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""


def call_key(run_id: str, step_id: str) -> str:
    """The idempotency key of one step's call: the same on every attempt, retry and redelivery."""
    return f"{run_id}:{step_id}"


def call_meta(run_id: str, step_id: str) -> dict[str, Any]:
    """The `_meta` of a step's tools/call request."""
    return {META_KEY: call_key(run_id, step_id)}


def check_key(key: str) -> str:
    """The key, once it is one the records can hold: 1 to MAX_LENGTH printable characters."""
    if not key or len(key) > MAX_LENGTH or not key.isprintable():
        raise IdempotencyConflict(f"idempotency key: expected 1 to {MAX_LENGTH} printable characters, got {len(key)}")
    return key


@dataclass(frozen=True)
class Claim:
    """Who holds an enqueue key: the run it started, and what was asked (to tell a reuse from a clash)."""

    run_id: str
    workflow: str
    request: str  # digest of the workflow's version and params

    def dump(self) -> str:
        return json.dumps({"run_id": self.run_id, "workflow": self.workflow, "request": self.request})

    @classmethod
    def load(cls, raw: bytes | str) -> Claim:
        return cls(**json.loads(raw))


def request_digest(version: str, params: dict[str, Any]) -> str:
    """What makes two enqueue requests the same: the workflow's version and its params."""
    text = json.dumps({"version": version, "params": params}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class EnqueueKeys:
    """The enqueue keys seen in the last TTL seconds, in Redis under the namespace (per caller, when known)."""

    def __init__(self, redis: Redis, namespace: str, ttl: int = TTL) -> None:
        self.redis = redis
        self.namespace = namespace
        self.ttl = ttl
        self._claim = redis.register_script(_CLAIM)
        self._take_over = redis.register_script(_TAKE_OVER)
        self._release = redis.register_script(_RELEASE)

    def _key(self, key: str, who: str | None) -> str:
        # Keyed by caller too: one caller's key never answers with another caller's run.
        scope = hashlib.sha256(f"{who or ''}\0{key}".encode()).hexdigest()
        return f"{self.namespace}:idempotency:{scope}"

    def claim(self, key: str, who: str | None, claim: Claim, started: Callable[[str], bool],
              wait: float = CLAIM_WAIT) -> str | None:  # fmt: skip
        """Claim key for the run about to start (None), or the id of the run an earlier claim started. That run is
        written a moment after its claim: it is waited for (`started`) up to `wait` seconds, after which its caller
        is taken for dead before it started its run, and this claim takes the key over. A clash (the same key for
        another workflow or other params) is refused."""
        name = self._key(key, who)
        held = self._claim(keys=[name], args=[claim.dump(), self.ttl])
        deadline = time.monotonic() + wait
        while held is not None:
            earlier = self._same(key, Claim.load(held), claim)
            if started(earlier.run_id):
                return earlier.run_id
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            held = self._take_over(keys=[name], args=[held, claim.dump(), self.ttl])
            deadline = time.monotonic() + wait
        return None

    def _same(self, key: str, earlier: Claim, claim: Claim) -> Claim:
        if (earlier.workflow, earlier.request) != (claim.workflow, claim.request):
            raise IdempotencyConflict(
                f"idempotency key {key!r} was used within {self.ttl // 3600} h for run {earlier.run_id} of workflow "
                f"'{earlier.workflow}' with other params or another version; use a new key"
            )
        return earlier

    def holder(self, key: str, who: str | None) -> str | None:
        """The run id the key answers with now, if any."""
        held = self.redis.get(self._key(key, who))
        return None if held is None else Claim.load(held).run_id

    def release(self, key: str, who: str | None, claim: Claim) -> None:
        """Give the key up after the run it was claimed for failed to start (a retry may then start it)."""
        self._release(keys=[self._key(key, who)], args=[claim.dump()])
