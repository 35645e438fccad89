"""Who may do what: roles grant actions on resources, checked by pycasbin; default deny.

Resources are `workflow:<name>`, `service:<name>`, `secret:<name>`, `vault` (the key ring), `tokens`,
`audit` and `records` (the SQL schema); a role's permission names an action and resource globs
(`workflow:deploy-*`). The `admin` action grants every action. Shipped roles: `viewer` (read runs and
services), `operator` (viewer, and run, enqueue, cancel and reveal — open sealed values of — any workflow),
`admin` (everything); the `access:` section of the configuration adds roles,
maps OIDC group or role claims to roles, and switches checking on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import cached_property
from pathlib import Path
from typing import Literal

import casbin
from casbin.util.builtin_operators import glob_match
from pydantic import BaseModel, ConfigDict, Field, model_validator
from redis import Redis

from orchestrator.errors import InvalidToken, PermissionDenied
from orchestrator.security.alerts import AlertSettings
from orchestrator.security.events import security_event
from orchestrator.security.identity import ISSUER, Identity, OidcVerifier, TokenBook, unverified_issuer

Action = Literal[
    "run", "enqueue", "cancel", "read", "reveal", "register", "deregister", "secrets", "keys", "audit", "admin"
]
ACTIONS: tuple[str, ...] = Action.__args__  # type: ignore[attr-defined]

# An RBAC model with resource globs: a role inherits another's permissions through `g`, and `admin` stands
# for every action. casbin's globMatch keeps `*` within one path segment, and our resources have no `/`.
MODEL = """
[request_definition]
r = sub, obj, act
[policy_definition]
p = sub, obj, act
[role_definition]
g = _, _
[policy_effect]
e = some(where (p.eft == allow))
[matchers]
m = g(r.sub, p.sub) && globMatch(r.obj, p.obj) && (r.act == p.act || p.act == "admin")
"""


class Role(BaseModel):
    """A role: the roles whose permissions it has too, and its own (action -> resource globs)."""

    model_config = ConfigDict(extra="forbid")
    inherits: list[str] = Field(default_factory=list)
    permissions: dict[Action, list[str]] = Field(default_factory=dict)


SHIPPED_ROLES: dict[str, Role] = {
    "viewer": Role(permissions={"read": ["workflow:*", "service:*"]}),
    "operator": Role(
        inherits=["viewer"], permissions={a: ["workflow:*"] for a in ("run", "enqueue", "cancel", "reveal")}
    ),
    "admin": Role(permissions={"admin": ["*"]}),
}


class OidcSettings(BaseModel):
    """An external identity provider whose JWTs callers may present (single sign-on; MFA stays with it)."""

    model_config = ConfigDict(extra="forbid")
    issuer: str
    audience: str
    jwks_url: str
    algorithms: list[str] = Field(default_factory=lambda: ["RS256"])
    subject_claim: str = "sub"
    claims: list[str] = Field(default_factory=lambda: ["groups", "roles"])  # claims holding group or role names

    @model_validator(mode="after")
    def _asymmetric_only(self) -> OidcSettings:
        # A symmetric algorithm would let anyone holding the provider's public key sign tokens.
        if any(algorithm.upper().startswith("HS") or algorithm.lower() == "none" for algorithm in self.algorithms):
            raise ValueError("'algorithms': only asymmetric algorithms (RS256, ES256, EdDSA, …) are accepted")
        return self


class SigningSettings(BaseModel):
    """Celery message signing: this process's X.509 key and certificate, and the directory of trusted
    certificates (PEM files); relative paths are relative to the configuration file."""

    model_config = ConfigDict(extra="forbid")
    key: Path
    certificate: Path
    store: Path
    digest: str = "sha256"


class AccessSettings(BaseModel):
    """The configuration's `access:` section; without it access control is off."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    roles: dict[str, Role] = Field(default_factory=dict)
    oidc: OidcSettings | None = None
    role_claims: dict[str, str | list[str]] = Field(default_factory=dict)  # claim value (a group) -> role(s)
    signing: SigningSettings | None = None  # off unless given
    alerts: AlertSettings = Field(default_factory=AlertSettings)  # repeated denials raise an alert

    @model_validator(mode="after")
    def _known_roles(self) -> AccessSettings:
        known = {**SHIPPED_ROLES, **self.roles}
        for name, role in self.roles.items():
            for parent in role.inherits:
                if parent not in known:
                    raise ValueError(f"roles.{name}.inherits: unknown role '{parent}' (roles: {', '.join(known)})")
        for claim, roles in self.role_claims.items():
            for role_name in [roles] if isinstance(roles, str) else roles:
                if role_name not in known:
                    raise ValueError(f"role_claims.{claim}: unknown role '{role_name}' (roles: {', '.join(known)})")
        return self

    @property
    def all_roles(self) -> dict[str, Role]:
        return {**SHIPPED_ROLES, **self.roles}


def enabled(settings: AccessSettings | None) -> bool:
    return settings is not None and settings.enabled


def alert_settings(settings: AccessSettings | None) -> AlertSettings:
    """The alert settings of a configuration's `access:` section (the defaults without one)."""
    return settings.alerts if settings is not None else AlertSettings()


class Policy:
    """The roles of a configuration as a casbin enforcer; decisions are cached (the policy never changes)."""

    def __init__(self, settings: AccessSettings) -> None:
        self.roles = settings.all_roles
        self._enforcer = casbin.Enforcer(casbin.Enforcer.new_model(text=MODEL))
        for name, role in self.roles.items():
            for parent in role.inherits:
                self._enforcer.add_grouping_policy(name, parent)
            for action, patterns in role.permissions.items():
                for pattern in patterns:
                    self._enforcer.add_policy(name, pattern, action)
        self._decisions: dict[tuple[tuple[str, ...], str, str], bool] = {}

    def allows(self, roles: Iterable[str], action: str, resource: str) -> bool:
        key = (tuple(roles), action, resource)
        decision = self._decisions.get(key)
        if decision is None:
            decision = any(self._enforcer.enforce(role, resource, action) for role in key[0] if role in self.roles)
            if len(self._decisions) < 10_000:
                self._decisions[key] = decision
        return decision

    def grants_any(self, roles: Iterable[str], action: str, kind: str) -> bool:
        """Whether the roles grant action on some resource of a kind (`workflow`): `runs` refuses a caller who
        may read no workflow at all rather than show an empty list."""
        seen: set[str] = set()
        pending = [role for role in roles if role in self.roles]
        while pending:
            name = pending.pop()
            if name in seen:
                continue
            seen.add(name)
            role = self.roles[name]
            pending.extend(parent for parent in role.inherits if parent in self.roles)
            for granted, patterns in role.permissions.items():
                if granted in (action, "admin") and any(_may_match(pattern, kind) for pattern in patterns):
                    return True
        return False

    def check(self, identity: Identity, action: str, resource: str) -> None:
        """Raise PermissionDenied (and report it) unless one of the identity's roles grants action on resource."""
        if not self.allows(identity.roles, action, resource):
            roles = ", ".join(identity.roles) or "no role"
            detail = {"action": action, "resource": resource, "roles": list(identity.roles), "where": "api"}
            security_event("permission-denied", identity.subject, detail)
            raise PermissionDenied(f"permission denied: {identity.subject} ({roles}) may not {action} on {resource}")


def _may_match(pattern: str, kind: str) -> bool:
    """Whether a resource glob can match some resource `<kind>:<name>`."""
    head, colon, _ = pattern.partition(":")
    return pattern == "*" or bool(colon and glob_match(kind, head))


class AccessControl:
    """Authentication and authorization of one configuration on one Redis: who the token is, what they may do."""

    def __init__(self, settings: AccessSettings, redis: Redis, namespace: str) -> None:
        self.settings = settings
        self.policy = Policy(settings)
        self.tokens = TokenBook(redis, namespace)

    @cached_property
    def oidc(self) -> OidcVerifier | None:
        oidc = self.settings.oidc
        if oidc is None:
            return None
        role_map = {claim: [roles] if isinstance(roles, str) else list(roles)
                    for claim, roles in self.settings.role_claims.items()}  # fmt: skip
        return OidcVerifier(oidc.issuer, oidc.audience, oidc.jwks_url, oidc.algorithms, oidc.subject_claim,
                            oidc.claims, role_map)  # fmt: skip

    def authenticate(self, token: str | None) -> Identity:
        try:
            if not token:
                raise InvalidToken("permission denied: no token (pass --token or set MCPO_TOKEN)")
            issuer = unverified_issuer(token)
            if issuer != ISSUER and self.oidc is not None and issuer == self.oidc.issuer:
                return self.oidc.verify(token)
            return self.tokens.verify(token)
        except InvalidToken as exc:
            security_event("permission-denied", "anonymous", {"reason": str(exc), "where": "api"})
            raise

    def require(self, token: str | None, action: str, resource: str | Callable[[], str]) -> Identity:
        """The caller's identity once it may do action on resource (computed only after authentication)."""
        identity = self.authenticate(token)
        self.policy.check(identity, action, resource() if callable(resource) else resource)
        return identity
