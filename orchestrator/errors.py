"""Every error the orchestrator raises, in one hierarchy."""

from __future__ import annotations


class OrchestratorError(Exception):
    """Base of every error raised by mcp-orchestrator."""


class ConfigError(OrchestratorError):
    """A configuration or workflow file is invalid; the message names file, workflow, step and field."""

    def __init__(self, message: str, *, source: str | None = None) -> None:
        self.source = source
        super().__init__(f"{source}: {message}" if source else message)


class WorkflowNotFound(ConfigError):
    """A workflow was asked for by a name the configuration does not define."""


class ExpressionError(ConfigError):
    """A `${ ... }` expression does not parse, or names a step it may not read."""


class LimitExceeded(ConfigError):
    """An input is over one of the configured limits (file bytes, steps, parameter bytes, expression length);
    the message names file, workflow, step, field and the limit."""


class BrokerError(OrchestratorError):
    """The broker cannot be reached, or no worker serves a queue a run needs."""


class RedisUnreachable(BrokerError):
    """Redis (run state, broker) refused the connection or did not answer within the client's socket timeout;
    the message names HOST:PORT. The CLI exits 3 on it: infrastructure, not the caller's input."""

    def __init__(self, address: str, detail: str = "") -> None:
        self.address = address
        super().__init__(f"Redis at {address} is not reachable{detail}")


class RunNotFound(OrchestratorError):
    """No run is known by the given id."""


class NotResumable(OrchestratorError):
    """A run cannot be resumed: it has not ended, names no such step, or its records lack what a resume needs."""


class IdempotencyConflict(OrchestratorError):
    """An idempotency key came back with another request than the one it started a run for (or is malformed)."""


class DeadLetterNotFound(OrchestratorError):
    """No dead letter is known by the given id, or it cannot be requeued (its body was cut)."""


class RecordsError(OrchestratorError):
    """The records database cannot be reached, has no schema yet, or holds what it should not."""


class RunTimeout(OrchestratorError):
    """A run did not finish within the time `Run.wait` was given."""


class ToolCallError(OrchestratorError):
    """An MCP tool call failed; `transient` says whether trying again may help."""

    transient = False

    def __init__(self, message: str, *, service: str = "", tool: str = "") -> None:
        self.service = service
        self.tool = tool
        super().__init__(message)


class ToolError(ToolCallError):
    """The tool answered with `is_error`: the tool itself reports failure."""


class TransportError(ToolCallError):
    """The server could not be reached, crashed, or broke the connection mid-call."""

    transient = True
    # The stdio session whose end (its server process died) failed the call; None for any other failure. The
    # calls one process's death fails count as one breaker failure.
    session: str | None = None


class StepTimeout(TransportError):
    """A tool call took longer than its step's timeout and was cancelled."""


class Unavailable(ToolCallError):
    """No instance of the service can take the call now (all failed their health beats, or none exists)."""


class CircuitOpen(Unavailable):
    """The service instance's circuit breaker is open: the call was refused without MCP traffic."""

    def __init__(self, message: str, *, retry_at: float | None = None) -> None:
        super().__init__(message)
        self.retry_at = retry_at  # epoch seconds when a trial may go; None: when half-open trials end


class Throttled(Unavailable):
    """The service's or tool's concurrency limit is reached across the fleet: the call was refused without MCP
    traffic, and waits in the broker for a slot (workers/policies/concurrency.py)."""

    def __init__(self, message: str, *, retry_at: float | None = None) -> None:
        super().__init__(message)
        self.retry_at = retry_at  # epoch seconds when the soonest lease holding the limit expires, at the latest


class RateLimited(Unavailable):
    """A service's, tool's or caller's rate limit has no slot for the call yet: refused without MCP traffic, the
    call waits in the broker for the slot it was given (workers/policies/rate.py); None when no slot comes before
    its deadline."""

    def __init__(self, message: str, *, retry_at: float | None = None) -> None:
        super().__init__(message)
        self.retry_at = retry_at  # epoch seconds of the slot kept for the call


class Cancelled(ToolCallError):
    """The run was cancelled while the call was in flight; the call was cancelled on the server too."""


class CredentialRejected(ToolCallError):
    """An HTTP server answered 401/403 to a vault credential even after one refresh; names the secret only."""


class VaultError(OrchestratorError):
    """The credential vault cannot do what was asked; the message names the secret, never its value."""


class SecretNotFound(VaultError):
    """No secret of that name (or of that version) is in the vault."""


class KeyRingMissing(VaultError):
    """Neither MCPO_VAULT_KEYS nor the key file gives this process a key ring."""


class SecretUndecryptable(VaultError):
    """A secret's ciphertext does not decrypt under the key ring (a retired or foreign key)."""


class SealedDataUnreadable(OrchestratorError):
    """Sealed data (a sensitive step's arguments, output or errors) does not open under this process's data key ring."""


class PermissionDenied(OrchestratorError):
    """The caller may not do what was asked (no token, an invalid one, or a role without the permission);
    the message names subject, action and resource, never the token."""


class InvalidToken(PermissionDenied):
    """A caller token is missing, malformed, wrongly signed, expired, revoked or bound to another run."""
