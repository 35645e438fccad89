"""The response cache (a service's `cache: {ttl, tools, max_bytes}`, a step's `cache:`): an answer kept fleet-wide
answers the same call again with no MCP traffic, and identical calls in flight at once make one call.

What is cached: the tools the service's `cache.tools` names, else those whose discovered annotations say
`readOnlyHint: true`; a step's `cache: false` opts out, `cache: true` or `{ttl}` opts in. Never a sensitive step's
answer, an error, or a fallback's answer (it stands in for another call). The key holds everything that decides the
answer: the service's server settings (credentials by name), the tool's discovered definition, the arguments, the
version of every secret the servers are called with (a rotation starts afresh) and, for a server reached with
OAuth, the caller (whose token may be what it answers to). The store is orchestrator/responses.py.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import threading
import time
from typing import Any

from orchestrator.config import CACHE_BYTES, Config, HttpServer
from orchestrator.messages import StepCall
from orchestrator.registry import Registry, definition_digest
from orchestrator.responses import ResponseCache
from workers import reclaim
from workers.credentials import Credentials
from workers.guard import CallGuard
from workers.pipeline import SETTLED, Attempt, Decision, Policy

FRESH_FOR = 1.0  # seconds a worker trusts what discovery said of a service's tools
POLL = 0.02  # seconds between looks at an answer another worker is fetching
LOOK_AT_LEADER = 25  # polls between looks at whether the worker fetching it still beats (every 0.5 s)


class Caching(Policy):
    """Answers from the response cache, keeps new answers, and lets one of identical calls in flight go."""

    options = ("cache",)

    def __init__(self, cache: ResponseCache, config: Config, registry: Registry, credentials: Credentials,
                 guard: CallGuard | None) -> None:  # fmt: skip
        self.cache = cache
        self.config = config
        self.registry = registry
        self.credentials = credentials
        self.guard = guard
        self._tools: dict[str, tuple[dict[str, dict[str, Any]], float]] = {}  # service -> (tools, read at)
        self._lock = threading.Lock()

    def answer(self, call: StepCall, attempt: Attempt) -> Decision | None:
        ttl = self._ttl(call)
        if ttl is None:
            return None
        key = self._key(call, attempt.arguments)
        attempt.held[Caching] = (key, ttl)
        if self._served(call, key, attempt):
            return SETTLED
        beat = reclaim.heartbeat()
        if self.cache.lead(key, max(call.deadline - time.time(), 0.001), beat[0] if beat else ""):
            attempt.held[Lead] = key
            return None  # this call fetches the answer; identical calls wait for it
        self._wait(call, key, beat[1] if beat else None)
        # Its answer, or (it failed, its worker died, or this call is out of time to wait) this call goes on its own.
        return SETTLED if self._served(call, key, attempt) else None

    def _wait(self, call: StepCall, key: str, heartbeats: str | None) -> None:
        """Wait while another call fetches key's answer, its worker beats, and this call has time."""
        for polled in itertools.count(1):
            if time.time() + POLL >= call.deadline or not self.cache.flying(key):
                return
            if heartbeats and polled % LOOK_AT_LEADER == 0 and not self.cache.leader_alive(key, heartbeats):
                return
            time.sleep(POLL)

    def _served(self, call: StepCall, key: str, attempt: Attempt) -> bool:
        hit = self.cache.get(call.service, key)
        if hit is None:
            return False
        result = attempt.result
        result.status, result.output, result.stale_age_s = "cached", hit[0], round(hit[1], 3)
        del attempt.held[Caching]
        return True

    def succeeded(self, call: StepCall, attempt: Attempt) -> None:
        held = attempt.held.pop(Caching, None)
        if held is not None:
            key, ttl = held
            settings = self.config.services[call.service].cache
            max_bytes = settings.max_bytes if settings is not None else CACHE_BYTES
            self.cache.put(call.service, key, attempt.result.output, ttl, max_bytes)
        self._land(attempt)

    def failed(self, call: StepCall, error: Exception, attempt: Attempt) -> None:
        self._land(attempt)  # each waiting call goes on its own
        return None

    def done(self, call: StepCall, attempt: Attempt) -> None:
        self._land(attempt)

    def _land(self, attempt: Attempt) -> None:
        key = attempt.held.pop(Lead, None)
        if key is not None:
            self.cache.land(key)

    def _ttl(self, call: StepCall) -> float | None:
        """How long this call's answer is kept; None: it is not cached."""
        if call.cache is False or call.sensitive or call.fallback_for:
            return None
        if not isinstance(call.cache, bool) and call.cache is not None:
            return float(call.cache)
        settings = self.config.services[call.service].cache
        if settings is None:
            return None
        if call.cache is True or (call.tool in settings.tools if settings.tools else self._read_only(call)):
            return settings.ttl
        return None

    def _read_only(self, call: StepCall) -> bool:
        tool = self._discovered(call.service).get(call.tool)
        return bool(tool and (tool.get("annotations") or {}).get("readOnlyHint"))

    @functools.cache  # noqa: B019 (one policy per worker process, for its life; the configuration does not change)
    def _servers(self, service: str) -> tuple[list[Any], list[str], bool]:
        """A service's servers as configured, the secrets they are called with, and whether one uses OAuth."""
        servers = [self.config.server_params(name) for name in self.config.services[service].servers]
        secrets = sorted({name for server in servers for name in server.secrets})
        oauth = any(isinstance(server, HttpServer) and server.oauth is not None for server in servers)
        return [server.model_dump(mode="json") for server in servers], secrets, oauth

    def _discovered(self, service: str) -> dict[str, dict[str, Any]]:
        with self._lock:
            known = self._tools.get(service)
        if known is not None and time.monotonic() - known[1] < FRESH_FOR:
            return known[0]
        tools = (self.registry.tools(service) or ({}, 0.0))[0]
        with self._lock:
            self._tools[service] = (tools, time.monotonic())
        return tools

    def _key(self, call: StepCall, arguments: dict[str, Any]) -> str:
        servers, secrets, oauth = self._servers(call.service)
        tool = self._discovered(call.service).get(call.tool)
        caller = self.guard.subject(call) if oauth and self.guard is not None else None
        decided_by = {
            "servers": servers,
            "tool": definition_digest(tool) if tool is not None else None,
            "arguments": arguments,
            "secrets": self.credentials.versions(secrets) if secrets else {},
            "caller": caller,
        }
        digest = hashlib.sha256(json.dumps(decided_by, sort_keys=True, default=str).encode()).hexdigest()
        return self.cache.key(call.service, call.tool, digest)


class Lead:
    """The key, in `attempt.held`, of the flight lock this call holds."""
