"""mcp-orchestrator: workflows over MCP servers, compiled to Celery canvases.

The whole public API::

    from orchestrator import Orchestrator
    orch = Orchestrator.from_file("examples/services.yaml")
    run = orch.enqueue("deployment", params={"env": "staging"})
    result = run.wait(timeout=60)
    orch.status(run.id)
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

# The errors import nothing: they are here at once, for `except orchestrator.ConfigError` anywhere.
from orchestrator.errors import (
    BrokerError,
    ConfigError,
    ExpressionError,
    LimitExceeded,
    OrchestratorError,
    RecordsError,
    RedisUnreachable,
    RunNotFound,
    RunTimeout,
    ToolCallError,
    ToolError,
    TransportError,
    WorkflowNotFound,
)

if TYPE_CHECKING:
    from orchestrator.api import Orchestrator, Run
    from orchestrator.config import Config, load_config
    from orchestrator.results import RunResult, StepError, StepResult
    from orchestrator.workflow import Step, Workflow

# The other public names are imported on first use (PEP 562): every process that imports any module of the
# package runs this file, and the API alone pulls in Celery, SQLAlchemy and the MCP SDK — seconds of start-up
# that `mcp-orchestrator --help`, most commands and a worker process do not need.
_LAZY: dict[str, str] = {
    "Orchestrator": "orchestrator.api",
    "Run": "orchestrator.api",
    "Config": "orchestrator.config",
    "load_config": "orchestrator.config",
    "RunResult": "orchestrator.results",
    "StepResult": "orchestrator.results",
    "StepError": "orchestrator.results",
    "Step": "orchestrator.workflow",
    "Workflow": "orchestrator.workflow",
}

# Hidden from type checkers, which see the names above: a visible module __getattr__ would make any misspelt
# `from orchestrator import …` type as Any instead of an error.
if not TYPE_CHECKING:

    def __getattr__(name: str) -> Any:
        module = _LAZY.get(name)
        if module is None:
            # Also how `from orchestrator import cli` falls through to importing the submodule.
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(import_module(module), name)
        globals()[name] = value  # later lookups find it without coming here
        return value

    def __dir__() -> list[str]:
        return sorted({*globals(), *_LAZY})


__all__ = [
    # Running workflows
    "Orchestrator",
    "Run",
    # Definitions
    "Config",
    "load_config",
    "Workflow",
    "Step",
    # Results
    "RunResult",
    "StepResult",
    "StepError",
    # Errors
    "OrchestratorError",
    "ConfigError",
    "WorkflowNotFound",
    "ExpressionError",
    "LimitExceeded",
    "BrokerError",
    "RedisUnreachable",
    "RunNotFound",
    "RunTimeout",
    "RecordsError",
    "ToolCallError",
    "ToolError",
    "TransportError",
]
