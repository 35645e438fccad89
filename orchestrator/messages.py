"""The step contract: a step as planned, with every default resolved once, and the message that carries it.

`PlannedStep` is a node of a run's graph: its service's timeout and retries, and its fallback's, are filled in
when the workflow is planned (`plan` in orchestrator/workflow.py), and nothing resolves them again. `StepCall`
is what a task message carries for one step: the planned step's fields for one run, plus the fields that change
as the call goes on (attempts, budget, what it stands in for). The compiler builds it; tasks and worker policies
read it. This module imports nothing of the project, so every side may import it.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

DEFAULT_TIMEOUT = 60.0  # seconds a step's call may take, when neither the step nor its service says
DEFAULT_RETRIES = 3  # retries of a step's call, when neither the step nor its service says
SHOWN = "[sealed]"  # what Flower and logs show of sealed arguments


@dataclass(frozen=True)
class PlannedFallback:
    """Where a step's call goes when its own service cannot serve it, with that service's budget."""

    service: str
    tool: str
    parameters: dict[str, Any]
    timeout: float
    retries: int


@dataclass(frozen=True)
class PlannedStep:
    """A step with its final id, the ids it waits for, and its budget resolved from its service."""

    id: str
    service: str
    tool: str
    parameters: dict[str, Any]
    timeout: float
    retries: int
    fallback: PlannedFallback | None
    depends_on: tuple[str, ...]
    where: str
    when: str | None = None
    optional: bool = False
    use_stale: float | None = None
    retry_tool_errors: bool = False
    sensitive: bool = False
    cache: bool | float | None = (
        None  # the step's own say on the response cache: off, on, or a TTL; None: its service's
    )


@dataclass(frozen=True)
class StepCall:
    """What a task message carries for one step: ids, service, tool, arguments — no connection details."""

    run_id: str
    step_id: str
    service: str
    tool: str
    arguments: dict[str, Any] | str  # a sensitive step's are sealed (orchestrator/security/sealing.py)
    timeout: float
    retries: int
    depends_on: list[str] = field(default_factory=list)
    reads: list[str] = field(default_factory=list)
    when: str | None = None
    optional: bool = False
    use_stale: float | None = None
    retry_tool_errors: bool = False
    fallback: dict[str, Any] | None = None  # {service, tool, arguments, timeout, retries}
    # Set as the call goes on: attempts made, when it began and its time budget ends, what it stands in for.
    attempt: int = 0
    started_at: float = 0.0
    deadline: float = 0.0
    attempt_errors: list[dict[str, Any]] = field(default_factory=list)
    fallback_for: dict[str, Any] | None = None  # {service, tool, arguments}: the call this one replaces
    caller: str | None = None  # the run's caller token (access control on): checked before any MCP traffic
    sensitive: bool = False  # arguments sealed; the worker seals the output and errors too
    opens: bool = False  # the run holds sealed data (params, outputs of sensitive steps) that this step may read
    cache: bool | float | None = None  # the step's own say on the response cache (see PlannedStep)

    def message(self) -> dict[str, Any]:
        """The task message's kwargs: fields left at their defaults are left out, since a chain's first
        message carries every later step's message too."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != _default(f)}

    def shown(self) -> str:
        """What Flower and logs show of the message: the run, the step and the arguments as written in the
        workflow (templates, not the values they resolve to), cut short; never its caller token, nor a
        sensitive step's arguments."""
        arguments = SHOWN if self.sensitive else json.dumps(self.arguments, separators=(",", ":"), default=str)
        return f"run={self.run_id} step={self.step_id} arguments={arguments[:200]}"


def _default(spec: Any) -> Any:
    return spec.default_factory() if spec.default_factory is not MISSING else spec.default
