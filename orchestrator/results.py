"""What a run produced: `RunResult` with one `StepResult` per step, as shown by `--json`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

RunStatus = Literal["pending", "running", "succeeded", "failed", "cancelled"]
StepStatus = Literal[
    "pending", "running", "succeeded", "cached", "failed", "skipped", "degraded", "stale-cache", "cancelled"
]
TERMINAL_RUN = ("succeeded", "failed", "cancelled")
TERMINAL_STEP = ("succeeded", "cached", "failed", "skipped", "degraded", "stale-cache", "cancelled")
# Statuses a dependent step may run after: the step produced an output, fresh, cached, stale or degraded.
SATISFIED = ("succeeded", "cached", "degraded", "stale-cache")


class AttemptError(BaseModel):
    """One failed attempt of a step's call."""

    attempt: int
    service: str
    instance: str
    type: str
    message: str
    at: float


class StepError(BaseModel):
    """A failure in a run: where, what, and how the run dealt with it (`handled_by`)."""

    step: str
    service: str
    tool: str
    instance: str = ""
    type: str
    message: str
    attempts: int = 0
    handled_by: str | None = None  # fallback, stale-cache, degraded or fallback-workflow; None: it failed


class StepResult(BaseModel):
    """The outcome of one step: its MCP call's output or error."""

    status: StepStatus = "pending"
    service: str
    tool: str
    output: Any = None
    error: str | None = None
    error_type: str | None = None
    attempts: int = 0
    attempt_errors: list[AttemptError] = Field(default_factory=list)
    instance: str | None = None
    served_by: str | None = None  # "service.tool" of the fallback that answered instead
    skip_reason: Literal["condition", "upstream"] | None = None
    stale_age_s: float | None = None  # the age of an answer served from a cache: `cached` or `stale-cache`
    duration_ms: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    worker: str | None = None
    arguments_digest: str | None = None  # sha256 of the call's canonical JSON arguments, for the audit
    reused_from: str | None = None  # the run whose output a resumed run took instead of calling again

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
    error_summary: dict[str, dict[str, int]] = Field(default_factory=dict)  # service → error type → count
    params: dict[str, Any] = Field(default_factory=dict)
    fallback_run: str | None = None  # the run of the workflow's fallback workflow, when it had to run
    resumed_from: str | None = None  # the run this one resumes (`mcp-orchestrator resume`)
    idempotency_key: str | None = None  # the key it was enqueued with, if any
    created_at: float | None = None
    finished_at: float | None = None

    @property
    def done(self) -> bool:
        return self.status in TERMINAL_RUN

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"


class InstanceStatus(BaseModel):
    """One instance of a service as `services` shows it: its health, tools, load and breaker."""

    service: str
    instance: str
    registered: bool = False  # at run time, rather than in the configuration
    health: Literal["up", "down", "unknown"] = "unknown"
    latency_ms: float | None = None
    last_seen: float | None = None  # when a health beat last found it up
    tools: int | None = None  # discovered
    in_flight: int = 0
    breaker: Literal["closed", "open", "half_open", "disabled"]
    failure_rate: float | None = None
    slow_rate: float | None = None
    calls: int = 0
    retry_at: float | None = None
