"""The worker's own access check, made before a step's MCP call: the enforcement point that holds credentials.

Anyone who can write to the broker could otherwise make a worker call any tool with the fleet's credentials,
so with access control on every `mcpo.call` message must carry its run's caller token: signed with the token
key, not expired, not revoked, bound to the message's run, and for a workflow the caller's role may run. The
signature is checked locally, once per token (a run's steps all carry the same one; expiry is checked on every
use); the revoked set is read from Redis at most once a second.
"""

from __future__ import annotations

import time

from redis import Redis

from orchestrator.config import Config
from orchestrator.errors import InvalidToken
from orchestrator.messages import StepCall
from orchestrator.security.access import Policy, enabled
from orchestrator.security.events import security_event
from orchestrator.security.identity import LEEWAY, CallerClaims, Revocations, SigningKey, verify_caller

VERIFIED_KEPT = 1024  # tokens whose signature this worker checked: one per run it served lately


class CallGuard:
    """Says why a step's message must not run (None when it may)."""

    def __init__(self, policy: Policy, signing: SigningKey, revocations: Revocations) -> None:
        self.policy = policy
        self.signing = signing
        self.revocations = revocations
        self._key: bytes | None = None
        self._verified: dict[str, CallerClaims] = {}  # by token

    @classmethod
    def of(cls, config: Config, redis: Redis, namespace: str) -> CallGuard | None:
        """The guard for a configuration; None when its access control is off."""
        if config.access is None or not enabled(config.access):
            return None
        return cls(Policy(config.access), SigningKey.from_environment(), Revocations(redis, namespace))

    def refusal(self, call: StepCall) -> str | None:
        """Why the call is refused, or None; every refusal is reported as a security event."""
        claims: CallerClaims | None = None
        try:
            claims = self._claims(call)
            reason = self._reason(call, claims)
        except InvalidToken as exc:
            reason = f"permission denied: {exc}"
        if reason is not None:
            subject = claims.subject if claims is not None else "anonymous"
            security_event("call-refused", subject, {"run_id": call.run_id, "step": call.step_id,
                                                     "service": call.service, "tool": call.tool, "reason": reason,
                                                     "where": "worker"})  # fmt: skip
        return reason

    def subject(self, call: StepCall) -> str | None:
        """Who the call is made for: the subject of its caller token, once `refusal` let it through."""
        claims = self._verified.get(call.caller) if call.caller else None
        return claims.subject if claims is not None else None

    def _claims(self, call: StepCall) -> CallerClaims:
        if not call.caller:
            raise InvalidToken("the message carries no caller token")
        claims = self._verified.get(call.caller)
        if claims is not None:
            if claims.expires_at + LEEWAY <= time.time():
                raise InvalidToken("invalid caller token (expired)")
            return claims
        if self._key is None:
            self._key = self.signing.load()
        claims = verify_caller(self._key, call.caller)
        if len(self._verified) >= VERIFIED_KEPT:
            self._verified.clear()
        self._verified[call.caller] = claims
        return claims

    def _reason(self, call: StepCall, claims: CallerClaims) -> str | None:
        if claims.run_id != call.run_id:
            return f"permission denied: the caller token of {claims.subject} is bound to another run"
        if self.revocations.revoked(claims.token_id, claims.parent_id):
            return f"permission denied: the token of {claims.subject} was revoked"
        resource = f"workflow:{claims.workflow}"
        if not self.policy.allows(claims.roles, claims.action, resource):
            return f"permission denied: {claims.subject} may not {claims.action} on {resource}"
        return None
