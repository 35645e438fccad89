"""What a run produced: `RunResult` with one `StepResult` per step, as shown by `--json`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

RunStatus = Literal["pending", "running", "succeeded", "failed", "cancelled"]
StepStatus = Literal["pending", "running", "succeeded", "failed", "skipped", "cancelled"]
TERMINAL_RUN = ("succeeded", "failed", "cancelled")
TERMINAL_STEP = ("succeeded", "failed", "skipped", "cancelled")


class StepError(BaseModel):
    """Why a step did not succeed."""

    step: str
    service: str
    tool: str
    type: str
    message: str
    attempts: int = 0


class StepResult(BaseModel):
    """The outcome of one step: its MCP call's output or error."""

    status: StepStatus = "pending"
    service: str
    tool: str
    output: Any = None
    error: str | None = None
    error_type: str | None = None
    attempts: int = 0
    duration_ms: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    worker: str | None = None

    @property
    def done(self) -> bool:
        return self.status in TERMINAL_STEP


class RunResult(BaseModel):
    """A run as seen now: its status, every step, the aggregated output and every error."""

    id: str
    workflow: str
    status: RunStatus = "pending"
    steps: dict[str, StepResult] = Field(default_factory=dict)
    output: Any = None
    errors: list[StepError] = Field(default_factory=list)
    params: dict[str, Any] = Field(default_factory=dict)
    created_at: float | None = None
    finished_at: float | None = None

    @property
    def done(self) -> bool:
        return self.status in TERMINAL_RUN

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"
