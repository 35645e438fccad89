"""Who is calling: tokens the orchestrator issues, JWTs from an OIDC provider, and caller tokens bound to a run.

Issued tokens are JWTs signed (HS256) with a key from MCPO_TOKEN_KEY or a key file (default
`<MCPO_HOME>/token.key`, mode 0600), never from Redis. Redis keeps each token's sha256, subject, role and
expiry (`<namespace>:tokens`), so a token is valid only while its record is there: revoking deletes the record
and puts its id in `<namespace>:tokens:revoked` (scored by expiry), the set workers read. A caller token is
minted at enqueue for one run and carried in each of its step messages: the worker verifies it locally (the
signature, the expiry, the run it is bound to) and reads the revoked set at most once a second.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis import Redis

from orchestrator.errors import InvalidToken, OrchestratorError
from orchestrator.history import events
from orchestrator.security.events import security_event
from orchestrator.settings import settings
from orchestrator.text import as_text

ISSUER = "mcp-orchestrator"
API_AUDIENCE = "mcpo:api"  # issued tokens: accepted by the API and CLI
CALL_AUDIENCE = "mcpo:call"  # caller tokens: accepted by workers only, for one run
ALGORITHM = "HS256"
LEEWAY = 5.0  # seconds of clock skew tolerated between the enqueuing host and the workers
REVOCATIONS_FRESH_FOR = 1.0  # seconds a worker uses the revoked set it read before reading it again
DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class IdentitySettings(BaseSettings):
    """MCPO_TOKEN (the caller's token), MCPO_TOKEN_KEY (the signing key) or MCPO_TOKEN_KEY_FILE."""

    model_config = SettingsConfigDict(env_prefix="MCPO_", extra="ignore")
    token: str | None = None
    token_key: str | None = None
    token_key_file: Path | None = None


@dataclass(frozen=True)
class Identity:
    """An authenticated caller: who, with which roles, by which token (its id, never the token)."""

    subject: str
    roles: tuple[str, ...]
    token_id: str | None
    expires_at: float | None
    source: str  # "issued" or "oidc"


@dataclass(frozen=True)
class TokenInfo:
    """What `tokens list` shows of an issued token: never the token."""

    id: str
    subject: str
    role: str
    issued_at: float
    expires_at: float


@dataclass(frozen=True)
class CallerClaims:
    """What a verified caller token says: who enqueued which run of which workflow, and how."""

    subject: str
    roles: tuple[str, ...]
    run_id: str
    workflow: str
    action: str
    token_id: str
    parent_id: str | None
    expires_at: float


def parse_duration(text: str) -> float:
    """Seconds in `90`, `90s`, `30m`, `8h`, `7d` or `2w`."""
    match = DURATION.match(text)
    if not match or float(match.group(1)) <= 0:
        raise OrchestratorError(f"invalid duration {text!r}: a positive number with s, m, h, d or w (8h, 30m)")
    return float(match.group(1)) * UNITS[match.group(2)]


class SigningKey:
    """The token signing key: given in the environment, else read from the key file."""

    def __init__(self, key: str | None = None, path: Path | None = None) -> None:
        self._key = key
        self.path = path

    @classmethod
    def from_environment(cls) -> SigningKey:
        identity = IdentitySettings()
        return cls(identity.token_key or None, identity.token_key_file or settings.home / "token.key")

    @property
    def source(self) -> str:
        return "MCPO_TOKEN_KEY" if self._key is not None else str(self.path)

    def load(self) -> bytes:
        if self._key is not None:
            return self._checked(self._key)
        if self.path is None or not self.path.exists():
            raise InvalidToken(
                f"no token signing key: set MCPO_TOKEN_KEY or create the key file {self.path} "
                "(`mcp-orchestrator init --secure` creates it)"
            )
        lines = [line.strip() for line in self.path.read_text().splitlines()]
        return self._checked(next((line for line in lines if line and not line.startswith("#")), ""))

    def _checked(self, text: str) -> bytes:
        try:
            key = base64.urlsafe_b64decode(text.encode())
        except ValueError:
            key = b""
        if len(key) < 32:
            raise InvalidToken(f"the token signing key ({self.source}) is not 32 or more base64 bytes")
        return key

    def ensure(self) -> bool:
        """Create the key file with a new random key unless a key exists; True when it was created."""
        if self._key is not None or self.path is None or self.path.exists():
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write("# mcp-orchestrator token signing key: every API host and worker needs it\n")
            handle.write(base64.urlsafe_b64encode(secrets.token_bytes(32)).decode() + "\n")
        return True


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _reason(exc: jwt.PyJWTError) -> str:
    # PyJWT's messages name claims and algorithms, never the token itself.
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "expired"
    if isinstance(exc, jwt.InvalidSignatureError):
        return "bad signature"
    return str(exc) or type(exc).__name__


class TokenBook:
    """Issued tokens of one namespace: issue, verify, list, revoke."""

    def __init__(self, redis: Redis, namespace: str, key: SigningKey | None = None) -> None:
        self.redis = redis
        self.key = f"{namespace}:tokens"
        self.revoked_key = f"{namespace}:tokens:revoked"
        self.signing = key or SigningKey.from_environment()

    def issue(self, subject: str, role: str, ttl: float, who: str | None = None) -> tuple[str, TokenInfo]:
        """A new token (returned once: only its hash is stored) and what is kept of it. `who` issued it (the
        audit row's subject; default: this process's user); the token's own subject is in the detail."""
        now = time.time()
        info = TokenInfo(id=uuid.uuid4().hex, subject=subject, role=role, issued_at=now, expires_at=now + ttl)
        claims = {"iss": ISSUER, "aud": API_AUDIENCE, "sub": subject, "role": role, "jti": info.id,
                  "iat": int(now), "exp": int(info.expires_at)}  # fmt: skip
        token = jwt.encode(claims, self.signing.load(), algorithm=ALGORITHM)
        record = {"subject": subject, "role": role, "issued_at": now, "expires_at": info.expires_at,
                  "sha256": _digest(token)}  # fmt: skip
        self.redis.hset(self.key, info.id, json.dumps(record))
        detail = {"token_id": info.id, "for": subject, "role": role, "expires_at": info.expires_at}
        security_event("token-issued", who or events.caller(), detail)
        return token, info

    def verify(self, token: str) -> Identity:
        """The identity of a token this orchestrator issued: signature, expiry and its stored record."""
        try:
            claims = jwt.decode(token, self.signing.load(), algorithms=[ALGORITHM], audience=API_AUDIENCE,
                                issuer=ISSUER, leeway=LEEWAY, options={"require": ["exp", "jti", "sub"]})  # fmt: skip
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"permission denied: invalid token ({_reason(exc)})") from None
        raw = self.redis.hget(self.key, str(claims["jti"]))
        record = json.loads(raw) if raw else None
        if record is None or not hmac.compare_digest(record["sha256"], _digest(token)):
            raise InvalidToken(f"permission denied: token {claims['jti']} of {claims['sub']} was revoked")
        return Identity(str(claims["sub"]), (str(claims["role"]),), str(claims["jti"]), float(claims["exp"]), "issued")

    def list(self) -> list[TokenInfo]:
        infos = []
        for token_id, raw in self.redis.hgetall(self.key).items():
            record = json.loads(raw)
            infos.append(TokenInfo(id=as_text(token_id), subject=record["subject"], role=record["role"],
                                   issued_at=record["issued_at"], expires_at=record["expires_at"]))  # fmt: skip
        return sorted(infos, key=lambda info: info.issued_at)

    def revoke(self, token_id: str, who: str | None = None) -> bool:
        """Delete a token's record and tell workers (the revoked set); False for an unknown id. `who` revoked it
        (default: this process's user)."""
        raw = self.redis.hget(self.key, token_id)
        if raw is None:
            return False
        record = json.loads(raw)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hdel(self.key, token_id)
        # A revoked id matters until the token would have expired anyway; caller tokens never outlive it by
        # more than a run's budget, so keep it a day longer.
        pipe.zadd(self.revoked_key, {token_id: float(record["expires_at"]) + 86400})
        pipe.zremrangebyscore(self.revoked_key, "-inf", time.time())
        pipe.execute()
        detail = {"token_id": token_id, "for": record["subject"], "role": record["role"]}
        security_event("token-revoked", who or events.caller(), detail)
        return True


class Revocations:
    """A worker's view of the revoked token ids, read from Redis at most once per `fresh_for` seconds."""

    def __init__(self, redis: Redis, namespace: str, fresh_for: float = REVOCATIONS_FRESH_FOR) -> None:
        self.redis = redis
        self.key = f"{namespace}:tokens:revoked"
        self.fresh_for = fresh_for
        self._ids: frozenset[str] = frozenset()
        self._read_at = float("-inf")
        self._lock = threading.Lock()

    def revoked(self, *token_ids: str | None) -> bool:
        if time.monotonic() - self._read_at > self.fresh_for:
            with self._lock:
                if time.monotonic() - self._read_at > self.fresh_for:
                    ids = self.redis.zrangebyscore(self.key, time.time(), "+inf")
                    self._ids = frozenset(as_text(token_id) for token_id in ids if isinstance(token_id, bytes | str))
                    self._read_at = time.monotonic()
        return any(token_id in self._ids for token_id in token_ids if token_id)


class OidcVerifier:
    """JWTs of an external OIDC provider, checked against its JWKS; group or role claims become roles."""

    def __init__(self, issuer: str, audience: str, jwks_url: str, algorithms: list[str], subject_claim: str,
                 claims: list[str], role_map: dict[str, list[str]]) -> None:  # fmt: skip
        self.issuer = issuer
        self.audience = audience
        self.algorithms = algorithms
        self.subject_claim = subject_claim
        self.claims = claims
        self.role_map = role_map
        self.jwks = jwt.PyJWKClient(jwks_url, cache_keys=True, lifespan=300, timeout=10)

    def verify(self, token: str) -> Identity:
        try:
            key = self.jwks.get_signing_key_from_jwt(token)
            claims = jwt.decode(token, key.key, algorithms=self.algorithms, audience=self.audience, issuer=self.issuer,
                                leeway=LEEWAY, options={"require": ["exp", "iss", "aud"]})  # fmt: skip
        except jwt.PyJWKClientConnectionError:
            raise InvalidToken(f"permission denied: cannot reach the JWKS of {self.issuer}") from None
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"permission denied: invalid token from {self.issuer} ({_reason(exc)})") from None
        subject = str(claims.get(self.subject_claim) or claims.get("sub") or "")
        if not subject:
            raise InvalidToken(f"permission denied: the token from {self.issuer} names no subject")
        roles = sorted({role for value in self._claimed(claims) for role in self.role_map.get(value, [])})
        token_id = str(claims["jti"]) if claims.get("jti") else None
        return Identity(subject, tuple(roles), token_id, float(claims["exp"]), "oidc")

    def _claimed(self, claims: dict[str, Any]) -> list[str]:
        values: list[str] = []
        for name in self.claims:
            value = claims.get(name)
            values.extend([value] if isinstance(value, str) else [str(v) for v in value or []])
        return values


def unverified_issuer(token: str) -> str | None:
    """The `iss` a token claims, read without checking it: only to choose which verifier checks it."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise InvalidToken("permission denied: the token is not a JWT") from None
    issuer = claims.get("iss")
    return str(issuer) if issuer is not None else None


def mint_caller(key: bytes, identity: Identity, run_id: str, workflow: str, action: str, ttl: float) -> str:
    """A token for one run's step messages: the caller, the run, the workflow and the action, for ttl seconds."""
    now = time.time()
    claims = {"iss": ISSUER, "aud": CALL_AUDIENCE, "sub": identity.subject, "roles": list(identity.roles),
              "run": run_id, "wf": workflow, "act": action, "jti": uuid.uuid4().hex, "par": identity.token_id,
              "iat": int(now), "exp": int(now + ttl) + 1}  # fmt: skip
    return jwt.encode(claims, key, algorithm=ALGORITHM)


def verify_caller(key: bytes, token: str) -> CallerClaims:
    """A caller token's claims once its signature, audience and expiry hold."""
    try:
        claims = jwt.decode(token, key, algorithms=[ALGORITHM], audience=CALL_AUDIENCE, issuer=ISSUER, leeway=LEEWAY,
                            options={"require": ["exp", "run", "wf", "act", "sub", "jti"]})  # fmt: skip
    except jwt.PyJWTError as exc:
        raise InvalidToken(f"invalid caller token ({_reason(exc)})") from None
    return CallerClaims(
        subject=str(claims["sub"]), roles=tuple(str(r) for r in claims.get("roles") or []), run_id=str(claims["run"]),
        workflow=str(claims["wf"]), action=str(claims["act"]), token_id=str(claims["jti"]),
        parent_id=str(claims["par"]) if claims.get("par") else None, expires_at=float(claims["exp"]),
    )  # fmt: skip
