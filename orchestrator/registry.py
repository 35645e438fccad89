"""The registry of instances and their discovered tools: what each service instance offers, with its
input schemas, and the instances registered at run time besides those of the configuration.

Workers fill the tools (each health beat, run on the service's own queue, asks every instance for its
tools, bypassing the client's list cache); `enqueue` checks every step against them before anything runs.
Only Streamable HTTP instances register at run time: a stdio instance is a command line, and accepting
command lines from Redis would let anyone who can write to it run programs on every worker.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any
from urllib.parse import urlsplit

from jsonschema import Draft202012Validator
from redis import Redis

from orchestrator.config import HttpServer
from orchestrator.errors import ConfigError
from orchestrator.expressions import OPEN
from orchestrator.health import HealthBook
from orchestrator.history.events import buffer_key, operation_event, record_operation
from orchestrator.messages import PlannedStep
from orchestrator.settings import settings
from orchestrator.text import as_text
from orchestrator.workflow import Graph


class Registry:
    """Discovered tools per service instance, in Redis."""

    def __init__(self, redis: Redis, namespace: str) -> None:
        self.redis = redis
        self.namespace = namespace

    def _key(self, service: str) -> str:
        return f"{self.namespace}:tools:{service}"

    def _instances_key(self, service: str) -> str:
        return f"{self.namespace}:instances:{service}"

    def register(self, service: str, instance: str, server: HttpServer, who: str | None = None) -> None:
        """Add (or replace) an instance of a service, reached over Streamable HTTP."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(self._instances_key(service), instance, server.model_dump_json())
        pipe.publish(HealthBook(self.redis, self.namespace).channel, service)
        if settings.records:
            url = _without_credentials(server.url)
            pipe.rpush(buffer_key(self.namespace), operation_event("register", who, service=service, instance=instance,
                                                                   detail={"url": url}))  # fmt: skip
        pipe.execute()

    def deregister(self, service: str, instance: str, who: str | None = None) -> bool:
        """Remove a registered instance and what was recorded of it; False when it was not registered."""
        removed = bool(self.redis.hdel(self._instances_key(service), instance))
        if removed:
            self.redis.hdel(self._key(service), instance)
            HealthBook(self.redis, self.namespace).forget(service, instance)
            if settings.records:
                record_operation(self.redis, self.namespace, "deregister", who, service=service, instance=instance)
        return removed

    def registered(self, service: str) -> dict[str, HttpServer]:
        """The instances registered at run time, by name."""
        raw = self.redis.hgetall(self._instances_key(service))
        return {as_text(name): HttpServer.model_validate_json(spec) for name, spec in raw.items()}

    def save(self, service: str, instance: str, tools: list[dict[str, Any]]) -> None:
        entry = {"tools": tools, "at": time.time()}
        self.redis.hset(self._key(service), instance, json.dumps(entry))

    def discovered(self, service: str) -> dict[str, int]:
        """How many tools each discovered instance of a service offers."""
        return {as_text(k): len(json.loads(v)["tools"]) for k, v in self.redis.hgetall(self._key(service)).items()}

    def tools(self, service: str) -> tuple[dict[str, dict[str, Any]], float] | None:
        """The tools every discovered instance of a service offers (name → tool), and when they were last seen."""
        entries = [json.loads(raw) for raw in self.redis.hgetall(self._key(service)).values()]
        if not entries:
            return None
        offered = [{tool["name"]: tool for tool in entry["tools"]} for entry in entries]
        common = {name: tool for name, tool in offered[0].items() if all(name in other for other in offered[1:])}
        return common, max(entry["at"] for entry in entries)

    def check(self, graph: Graph, source: str | None) -> None:
        """Reject a step whose tool a discovered service no longer offers, or whose literal arguments
        do not fit the tool's input schema; services never discovered are not checked."""
        discovered = {service: self.tools(service) for service in {step.service for step in graph.steps}}
        for step in graph.steps:
            if (tools := discovered[step.service]) is not None:
                _check_step(step, *tools, source)


def definition(tool: Any) -> dict[str, Any]:
    """What discovery keeps of an MCP tool (the SDK's `Tool`): everything that defines it, as JSON."""
    annotations = tool.annotations.model_dump(by_alias=True, exclude_none=True) if tool.annotations else None
    return {"name": tool.name, "description": tool.description, "input_schema": tool.input_schema,
            "output_schema": tool.output_schema, "annotations": annotations}  # fmt: skip


def definition_digest(tool: dict[str, Any]) -> str:
    """A hash of a tool's definition: any change to it (a new schema, description or annotation) changes it."""
    return hashlib.sha256(json.dumps(tool, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _check_step(step: PlannedStep, tools: dict[str, dict[str, Any]], at: float, source: str | None) -> None:
    seen = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))
    if step.tool not in tools:
        offered = ", ".join(sorted(tools)) or "none"
        raise ConfigError(
            f"{step.where}, field 'tool': service '{step.service}' does not offer tool '{step.tool}' "
            f"(discovered {seen}: {offered}); it may have disappeared from the server",
            source=source,
        )
    schema = tools[step.tool].get("input_schema") or {}
    literal = {key: value for key, value in step.parameters.items() if not _has_template(value)}
    templated = set(step.parameters) - set(literal)
    for error in Draft202012Validator(schema).iter_errors(literal):
        if error.validator == "required" and all(name in templated for name in _missing(error)):
            continue  # those arguments come from templates, known only at run time
        path = ".".join(str(part) for part in error.absolute_path)
        field = f"parameters.{path}" if path else "parameters"
        raise ConfigError(
            f"{step.where}, field '{field}': {error.message} (tool '{step.tool}' of service '{step.service}')",
            source=source,
        )


def _has_template(value: Any) -> bool:
    if isinstance(value, str):
        return OPEN in value
    if isinstance(value, dict):
        return any(_has_template(item) for item in value.values())
    if isinstance(value, list):
        return any(_has_template(item) for item in value)
    return False


def _missing(error: Any) -> list[str]:
    instance = error.instance if isinstance(error.instance, dict) else {}
    return [name for name in error.validator_value if name not in instance]


def _without_credentials(url: str) -> str:
    """The URL for the record: no user, password or query string, where credentials tend to hide."""
    parts = urlsplit(url)
    host = f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname or ""
    return parts._replace(netloc=host, query="").geturl()
