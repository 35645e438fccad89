"""Configuration: MCP servers, the services that front them, and workflows (YAML or JSON files)."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator, model_validator

from orchestrator.breaker import BreakerSettings
from orchestrator.concurrency import ServiceLimits
from orchestrator.errors import ConfigError, LimitExceeded, WorkflowNotFound
from orchestrator.limits import YAML_DEPTH, Limits, check_file, check_identifier, check_workflow, load_yaml
from orchestrator.messages import DEFAULT_RETRIES, DEFAULT_TIMEOUT
from orchestrator.security.access import AccessSettings, enabled
from orchestrator.security.secretref import SecretRef, Value
from orchestrator.settings import check_verify, settings
from orchestrator.workflow import Graph, Workflow, plan


class OAuthSettings(BaseModel):
    """`auth: {oauth: {...}}`: OAuth 2.1 through the MCP SDK's providers, its tokens kept in the vault and
    shared by every worker. The token endpoint comes from the issuer's metadata (RFC 8414), and credentials
    go to no other authorization server than `issuer`."""

    model_config = ConfigDict(extra="forbid")
    grant: Literal["client_credentials", "private_key_jwt", "identity_assertion"]
    client_id: str = Field(min_length=1)
    issuer: str = Field(pattern=r"^https?://[^/\s]+", description="the authorization server's issuer URL")
    client_secret: SecretRef | None = None
    private_key: SecretRef | None = None  # private_key_jwt: a PEM key that signs each client assertion
    assertion: SecretRef | None = None  # a JWT obtained elsewhere (workload identity, an enterprise IdP's ID-JAG)
    algorithm: str = "RS256"
    scopes: list[str] = Field(default_factory=list)
    token_endpoint_auth_method: Literal["client_secret_basic", "client_secret_post"] = "client_secret_basic"
    refresh_before: float = Field(default=60.0, gt=0)  # seconds before expiry; at most a quarter of the lifetime

    @model_validator(mode="after")
    def _credentials_fit_the_grant(self) -> OAuthSettings:
        given = {name for name in ("client_secret", "private_key", "assertion") if getattr(self, name) is not None}
        needed = {
            "client_credentials": ({"client_secret"},),
            "private_key_jwt": ({"private_key"}, {"assertion"}),
            "identity_assertion": ({"client_secret", "assertion"},),
        }[self.grant]
        if given not in needed:
            choices = " or ".join(" and ".join(sorted(option)) for option in needed)
            raise ValueError(f"grant '{self.grant}' takes {choices} (each a {{secret: NAME}}), no other credential")
        return self

    @property
    def secrets(self) -> list[str]:
        """Names of the vault secrets the grant reads."""
        refs = (self.client_secret, self.private_key, self.assertion)
        return sorted({ref.secret for ref in refs if ref is not None})


class HttpAuth(BaseModel):
    """`auth: {bearer: {secret: NAME}}`: an `Authorization: Bearer <secret>` header on every request;
    `auth: {oauth: {...}}`: an OAuth access token, obtained and refreshed once for the whole fleet."""

    model_config = ConfigDict(extra="forbid")
    bearer: SecretRef | None = None
    oauth: OAuthSettings | None = None

    @model_validator(mode="after")
    def _one_scheme(self) -> HttpAuth:
        if (self.bearer is None) == (self.oauth is None):
            raise ValueError("give 'bearer' or 'oauth', exactly one of them")
        return self


class StdioServer(BaseModel):
    """An MCP server started as a child process speaking over stdin/stdout."""

    model_config = ConfigDict(extra="ignore")  # mcp.json files carry client-specific keys
    type: Literal["stdio"] = "stdio"
    command: str
    args: list[str] = Field(default_factory=list)
    env: dict[str, Value] = Field(default_factory=dict)
    cwd: str | None = None

    @property
    def secrets(self) -> list[str]:
        """Names of the vault secrets its environment carries."""
        return sorted({value.secret for value in self.env.values() if isinstance(value, SecretRef)})


class HttpServer(BaseModel):
    """An MCP server reached over Streamable HTTP."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["http"] = "http"
    url: str = Field(pattern=r"^https?://[^/\s]+", description="the Streamable HTTP endpoint: http:// or https://")
    headers: Mapping[str, Value] = Field(default_factory=dict)  # Mapping: a dict[str, str] is one too
    auth: HttpAuth | None = None
    verify: bool | str = True  # certificate checks: the default CAs, or the CA bundle this path names

    @field_validator("verify")
    @classmethod
    def _checks_stay_on(cls, verify: bool | str) -> bool | str:
        check_verify(verify, settings.allow_insecure_tls)
        return verify

    @property
    def secret_headers(self) -> dict[str, tuple[str, str]]:
        """Headers whose value comes from the vault: name -> (secret, prefix before the value)."""
        headers = {name: (value.secret, "") for name, value in self.headers.items() if isinstance(value, SecretRef)}
        if self.auth is not None and self.auth.bearer is not None:
            headers["Authorization"] = (self.auth.bearer.secret, "Bearer ")
        return headers

    @property
    def oauth(self) -> OAuthSettings | None:
        return self.auth.oauth if self.auth is not None else None

    @property
    def secrets(self) -> list[str]:
        """Names of the vault secrets it is called with: its headers', its bearer's, its OAuth grant's."""
        grant = self.oauth.secrets if self.oauth is not None else []
        return sorted({secret for secret, _ in self.secret_headers.values()} | set(grant))

    @property
    def plain_headers(self) -> dict[str, str]:
        return {name: value for name, value in self.headers.items() if isinstance(value, str)}

    @model_validator(mode="before")
    @classmethod
    def _transport_names(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") in ("streamable-http", "streamableHttp", "http"):
            return {**data, "type": "http"}
        if isinstance(data, dict) and data.get("type") == "sse":
            raise ValueError("SSE transport is not supported; use the server's Streamable HTTP endpoint")
        return data


Server = Annotated[StdioServer | HttpServer, Field(union_mode="left_to_right")]


class HealthSettings(BaseModel):
    """How often celery beat checks each instance of a service, and how long a check may take."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    interval: float = Field(default=30.0, gt=0)
    timeout: float = Field(default=10.0, gt=0)
    # After a call fails on an instance, other instances take its calls for this long (or until a beat passes).
    avoid_after_failure: float = Field(default=10.0, ge=0)


CACHE_BYTES = 64 * 2**20  # what a service's cached answers may take in Redis, unless its `cache.max_bytes` says


class CacheSettings(BaseModel):
    """A service's `cache:`: how long answers are kept, for which tools (none named: every tool whose discovered
    annotations say `readOnlyHint: true`), and how many bytes of answers the service may keep (LRU)."""

    model_config = ConfigDict(extra="forbid")
    ttl: float = Field(gt=0, allow_inf_nan=False)
    tools: list[str] = Field(default_factory=list)
    max_bytes: StrictInt = Field(default=CACHE_BYTES, ge=1024)


class BatchSettings(BaseModel):
    """A service's `batch:`: a parallel group of at least `min_group` of its calls is sent as messages of up to
    `max_calls` calls each, which a worker makes at once (orchestrator/batching.py). `batch: false`: never."""

    model_config = ConfigDict(extra="forbid")
    max_calls: StrictInt = Field(default=64, ge=2, le=1000)
    min_group: StrictInt = Field(default=16, ge=2)


class Service(BaseModel):
    """What a worker pool serves and a queue is named after: one server, or several instances of it
    (`instances`: server names), and the tools callers may use."""

    model_config = ConfigDict(extra="forbid")
    server: str | None = None
    instances: list[str] = Field(default_factory=list)
    tools: list[str] = Field(default_factory=list)
    timeout: float = Field(default=DEFAULT_TIMEOUT, gt=0, allow_inf_nan=False)
    retries: int = Field(default=DEFAULT_RETRIES, ge=0)
    description: str | None = None
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    health: HealthSettings = Field(default_factory=HealthSettings)
    limits: ServiceLimits = Field(default_factory=ServiceLimits)  # calls at once and started, across the fleet
    cache: CacheSettings | None = None  # answers of read-only tools kept fleet-wide (orchestrator/responses.py)
    batch: BatchSettings | None = Field(default_factory=BatchSettings)  # None: `batch: false`

    @field_validator("batch", mode="before")
    @classmethod
    def _batch_on_or_off(cls, value: Any) -> Any:
        return {} if value is True else None if value is False else value

    @model_validator(mode="after")
    def _one_way_to_name_servers(self) -> Service:
        if (self.server is None) == (not self.instances):
            raise ValueError("give 'server' (one server) or 'instances' (a list of servers), exactly one of them")
        if len(set(self.instances)) != len(self.instances):
            raise ValueError("'instances' names a server twice")
        return self

    @property
    def servers(self) -> list[str]:
        """The configured instances: server names."""
        return [self.server] if self.server is not None else list(self.instances)


class Config(BaseModel):
    """A whole configuration file; `mcpServers` (as in mcp.json) is read as `servers`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    servers: dict[str, Server] = Field(default_factory=dict, alias="mcpServers")
    services: dict[str, Service] = Field(default_factory=dict)
    workflows: dict[str, Workflow] = Field(default_factory=dict)
    access: AccessSettings | None = None  # absent: access control is off (the embedded default)
    limits: Limits = Field(default_factory=Limits)
    source: str | None = Field(default=None, exclude=True)
    base_dir: Path = Field(default_factory=Path.cwd, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _both_server_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "servers" in data and "mcpServers" in data:
            raise ValueError("give 'servers' or 'mcpServers', not both")
        servers = data.get("servers", data.get("mcpServers")) if isinstance(data, dict) else None
        for name, server in servers.items() if isinstance(servers, dict) else ():
            # Either transport would ignore the other's key (mcp.json files carry extra keys): say which is meant.
            if isinstance(server, dict) and "command" in server and "url" in server:
                raise ValueError(f"servers.{name}: give 'command' (a stdio server) or 'url' (HTTP), not both")
        return data

    @model_validator(mode="after")
    def _names_fit_the_records(self) -> Config:
        for section in ("servers", "services", "workflows"):
            for name in getattr(self, section):
                check_identifier(name, f"{section}: a name")
        for name, service in self.services.items():
            for tool in service.tools:
                check_identifier(tool, f"services.{name}.tools: a tool name")
        return self

    @model_validator(mode="after")
    def _limits_and_cache_fit_the_services(self) -> Config:
        # A limit or a cache on a tool the service does not offer would never apply: most likely a misspelt name.
        for name, service in self.services.items():
            if service.limits.per_caller is not None and (self.access is None or not enabled(self.access)):
                raise ValueError(f"services.{name}.limits.per_caller: needs access control (an `access:` section "
                                 "that is on): without it every call comes from the same caller")  # fmt: skip
            named = [("limits.tools", tool) for tool in service.limits.tools]
            named += [("cache.tools", tool) for tool in (service.cache.tools if service.cache else [])]
            for field, tool in named:
                check_identifier(tool, f"services.{name}.{field}: a tool name")
                if service.tools and tool not in service.tools:
                    known = ", ".join(service.tools)
                    raise ValueError(f"services.{name}.{field}: unknown tool '{tool}' (the service's tools: {known})")
        return self

    @model_validator(mode="after")
    def _implicit_services(self) -> Config:
        # A server no service names is served as a service of the same name, with any of its tools.
        named = {server for service in self.services.values() for server in service.servers}
        for name in self.servers:
            if name not in named and name not in self.services:
                self.services[name] = Service(server=name)
        for name, service in self.services.items():
            field = "server" if service.server is not None else "instances"
            for server in service.servers:
                if server not in self.servers:
                    known = ", ".join(sorted(self.servers)) or "none"
                    raise ValueError(f"services.{name}.{field}: unknown server '{server}' (servers: {known})")
        return self

    def workflow(self, name: str) -> Workflow:
        if name not in self.workflows:
            known = ", ".join(sorted(self.workflows)) or "none"
            raise WorkflowNotFound(f"no workflow named '{name}' (workflows: {known})", source=self.source)
        return self.workflows[name]

    def _defaults(self, service: str) -> tuple[float, int]:
        # An unknown service gets the built-in budget here; `graph` refuses it right after planning.
        known = self.services.get(service)
        return (known.timeout, known.retries) if known is not None else (DEFAULT_TIMEOUT, DEFAULT_RETRIES)

    def graph(self, workflow: Workflow, name: str, source: str | None = None) -> Graph:
        """Plan a workflow and check every step against the services: the compile-time checks."""
        source = source or self.source
        check_workflow(workflow, name, self.limits, source)
        graph = plan(workflow, name, source, self._defaults)
        for step in graph.steps:
            self._check_call(step.service, step.tool, step.where, "", source)
            if step.cache is True and self.services[step.service].cache is None:
                raise ConfigError(f"{step.where}, field 'cache': service '{step.service}' has no `cache:` (its TTL)",
                                  source=source)  # fmt: skip
            if step.fallback:
                self._check_call(step.fallback.service, step.fallback.tool, step.where, "fallback.", source)
        if workflow.fallback is not None and workflow.fallback not in self.workflows:
            raise ConfigError(
                f"workflow '{name}', field 'fallback': unknown workflow '{workflow.fallback}'", source=source
            )
        return graph

    def _check_call(self, service: str, tool: str, where: str, prefix: str, source: str | None) -> None:
        if service not in self.services:
            known = ", ".join(sorted(self.services)) or "none"
            raise ConfigError(
                f"{where}, field '{prefix}service': unknown service '{service}' (services: {known})", source=source
            )
        allowed = self.services[service].tools
        if allowed and tool not in allowed:
            raise ConfigError(
                f"{where}, field '{prefix}tool': tool '{tool}' is not in service '{service}' tools "
                f"({', '.join(allowed)})",
                source=source,
            )

    def check(self) -> dict[str, Graph]:
        """Plan every workflow of the file; raises ConfigError at the first problem."""
        return {name: self.graph(workflow, name) for name, workflow in self.workflows.items()}

    def server_params(self, server: str) -> StdioServer | HttpServer:
        """The server's settings, with `python` meaning this interpreter and paths relative to the file."""
        spec = self.servers[server]
        if isinstance(spec, HttpServer):
            verify = spec.verify
            return spec if isinstance(verify, bool) else spec.model_copy(update={"verify": str(self.base_dir / verify)})
        command = sys.executable if spec.command in ("python", "python3") else spec.command
        cwd = str((self.base_dir / spec.cwd).resolve()) if spec.cwd else str(self.base_dir)
        return spec.model_copy(update={"command": command, "cwd": cwd})


def read_document(path: str | Path, max_bytes: int | None = None) -> Any:
    """Parse a YAML or JSON file (JSON is YAML), with the position of a syntax error; a file over max_bytes
    (default MCPO_MAX_CONFIG_BYTES) is refused unread. YAML is loaded safely: no tag builds a Python object."""
    path = Path(path)
    if max_bytes is None:
        check_file(path, settings.max_config_bytes, "MCPO_MAX_CONFIG_BYTES")
    else:
        check_file(path, max_bytes, "limits.workflow_bytes")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", source=str(path)) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text (an invalid byte at offset {exc.start})", source=str(path)) from exc
    try:
        if path.suffix == ".json":
            return json.loads(text, object_pairs_hook=lambda pairs: _unique_keys(pairs, str(path)))
        return load_yaml(text, str(path))
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"line {exc.lineno}, column {exc.colno}: malformed JSON: {exc.msg}", source=str(path)
        ) from exc
    except RecursionError as exc:  # the json module recurses per level of nesting
        raise LimitExceeded(f"JSON nested over {YAML_DEPTH} levels deep", source=str(path)) from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        position = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{position}malformed YAML: {problem.splitlines()[0]}", source=str(path)) from exc


def _unique_keys(pairs: list[tuple[str, Any]], source: str) -> dict[str, Any]:
    """A JSON object, refusing a key given twice (json would keep the last one silently)."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ConfigError(f"duplicate key '{key[:100]}'", source=source)
        seen[key] = value
    return seen


def validation_message(error: ValidationError) -> str:
    """Pydantic's errors as `field.path[0].name: message` lines."""
    lines = []
    for item in error.errors():
        path = ""
        for part in item["loc"]:
            if isinstance(part, int):
                path += f"[{part}]"
            elif part not in ("StdioServer", "HttpServer", "function-after[_implicit_services()]", "str", "SecretRef"):
                path += f".{part}" if path else str(part)
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"field '{path}': {message}" if path else message)
    return "; ".join(lines)


def parse_config(data: Any, source: str | None = None, base_dir: Path | None = None) -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping at the top level, found {type(data).__name__}", source=source)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc), source=source) from exc
    except LimitExceeded as exc:  # raised by a validator, past pydantic: the file is named here
        raise LimitExceeded(str(exc), source=source) from exc
    config.source = source
    config.base_dir = base_dir or Path.cwd()
    return config


def load_config(path: str | Path) -> Config:
    """Load and check a configuration file; every workflow in it is planned, so errors surface now."""
    path = Path(path)
    config = parse_config(read_document(path), str(path), path.resolve().parent)
    config.check()
    return config


def load_workflow(path: str | Path, config: Config) -> tuple[str, Workflow]:
    """Load a workflow file: one workflow, or a file whose `workflows` holds exactly one."""
    path = Path(path)
    data = read_document(path, config.limits.workflow_bytes)
    if isinstance(data, dict) and "workflows" in data:
        workflows = data["workflows"] or {}
        if not isinstance(workflows, dict):
            raise ConfigError(
                f"field 'workflows': expected a mapping, found {type(workflows).__name__}", source=str(path)
            )
        if len(workflows) != 1:
            raise ConfigError(f"holds {len(workflows)} workflows; name one of them instead", source=str(path))
        ((name, data),) = workflows.items()
    else:
        name = data.get("id") if isinstance(data, dict) and data.get("id") else path.stem
    if not isinstance(data, dict):
        raise ConfigError("expected a workflow mapping with 'steps'", source=str(path))
    try:
        workflow = Workflow.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"workflow '{name}': {validation_message(exc)}", source=str(path)) from exc
    config.graph(workflow, str(name), str(path))
    return str(name), workflow
