"""mcp-orchestrator: workflows over MCP servers, compiled to Celery canvases.

The whole public API::

    from orchestrator import Orchestrator
    orch = Orchestrator.from_file("examples/services.yaml")
    run = orch.enqueue("deployment", params={"env": "staging"})
    result = run.wait(timeout=60)
    orch.status(run.id)
"""

from orchestrator.api import Orchestrator, Run
from orchestrator.config import Config, load_config
from orchestrator.errors import (
    BrokerError,
    ConfigError,
    ExpressionError,
    LimitExceeded,
    OrchestratorError,
    RecordsError,
    RunNotFound,
    RunTimeout,
    ToolCallError,
    ToolError,
    TransportError,
    WorkflowNotFound,
)
from orchestrator.results import RunResult, StepError, StepResult
from orchestrator.workflow import Step, Workflow

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
    "RunNotFound",
    "RunTimeout",
    "RecordsError",
    "ToolCallError",
    "ToolError",
    "TransportError",
]
