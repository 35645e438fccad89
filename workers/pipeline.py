"""The call pipeline: every per-call policy a worker applies to a step's MCP call, in the one order they run in.

A policy (workers/policies/) is a small class whose hooks are no-ops until it overrides them:

- `starting(call)`: as a message is taken up, before anything else: the call to go on with (its budget set).
- `refusal(call)`: before any MCP traffic; a reason refuses the call (the step fails with it).
- `reading(call, pipe, attempt)`: commands to queue on the step's first round trip (the one that reads its inputs);
  what it returns is handed their replies.
- `answer(call, attempt)`: before each attempt, its arguments rendered: a policy that can answer without calling
  (a cached answer) fills in the result and answers `SETTLED`; no MCP traffic, no attempt.
- `place(call, attempt)`: the instance each attempt goes to, its arguments rendered; the first policy that names
  one decides (raising an `OrchestratorError` refuses the attempt, as a breaker does).
- `admit(call, attempt)`: once the attempt is placed and its session open, just before the call; raising an
  `OrchestratorError` refuses the attempt (no MCP traffic), which then goes to `attempted` and `refused`.
- `refused(call, error)`: a call that was not made (a breaker or a limit refused it): a `Retry` waits in the broker.
- `attempted(call, attempt, error, seconds)`: after each attempt, made or refused, with how it ended.
- `succeeded(call, attempt)`: after the attempt that succeeded.
- `failed(call, error, attempt)`: after a failed attempt. A policy may answer `AGAIN` (retry at once), a
  `Retry` (back off in the broker), a `Reroute` (the fallback service), or `SETTLED` (it gave the step its
  final result: a stale or degraded answer). The first policy that answers decides; when none does, the
  step fails.
- `finishing(call, result)`: the step's final result as it is to be recorded (sealed, for a sensitive step).
- `recording(call, result, pipe, attempt)`: writes to queue on the round trip that records the final result.
- `done(call, attempt)`: the message is finished with, however it ended: give back what is held and unused.

An `Attempt` is one message's: its `held` is where a policy keeps what it holds from one hook to the next.
`workers/policies/__init__.py` writes their order, once. A new policy is one module there and one line in that order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from redis.client import Pipeline as RedisPipeline

from orchestrator.errors import Unavailable
from orchestrator.messages import StepCall
from orchestrator.results import StepResult


@dataclass(frozen=True)
class Retry:
    """Send the call again after `countdown` seconds."""

    call: StepCall
    countdown: float


@dataclass(frozen=True)
class Reroute:
    """Hand the call to another service's queue (the step's fallback)."""

    call: StepCall


class Decision:
    """A decision that carries nothing: `AGAIN` or `SETTLED`."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


AGAIN = Decision("AGAIN")  # make the next attempt now, in this task
SETTLED = Decision("SETTLED")  # the step's result is final as the policy left it

Outcome = StepResult | Retry | Reroute


Reader = Callable[[list[Any]], None]  # takes the replies to the commands a policy queued on a round trip


@dataclass
class Attempt:
    """The attempt a hook is told of: its rendered arguments, the step's result as it stands, and what policies
    hold for this message (a lease, a permit), each under a key of its own."""

    arguments: dict[str, Any]
    result: StepResult
    held: dict[Any, Any] = field(default_factory=dict)


class Policy:
    """One per-call behaviour. `options` names the step options (fields of a workflow's `Step`) it owns."""

    options: ClassVar[tuple[str, ...]] = ()

    def starting(self, call: StepCall) -> StepCall:
        return call

    def refusal(self, call: StepCall) -> str | None:
        return None

    def reading(self, call: StepCall, pipe: RedisPipeline, attempt: Attempt) -> Reader | None:
        return None

    def answer(self, call: StepCall, attempt: Attempt) -> Decision | None:
        return None

    def admit(self, call: StepCall, attempt: Attempt) -> None:
        return None

    def place(self, call: StepCall, attempt: Attempt) -> str | None:
        return None

    def refused(self, call: StepCall, error: Exception) -> Retry | None:
        return None

    def attempted(self, call: StepCall, attempt: Attempt, error: Exception | None, seconds: float) -> None:
        return None

    def succeeded(self, call: StepCall, attempt: Attempt) -> None:
        return None

    def failed(self, call: StepCall, error: Exception, attempt: Attempt) -> Decision | Retry | Reroute | None:
        return None

    def finishing(self, call: StepCall, result: StepResult) -> StepResult:
        return result

    def recording(self, call: StepCall, result: StepResult, pipe: RedisPipeline, attempt: Attempt) -> None:
        return None

    def done(self, call: StepCall, attempt: Attempt) -> None:
        return None


P = TypeVar("P", bound=Policy)
HOOKS = ("starting", "refusal", "reading", "answer", "admit", "place", "refused", "attempted", "succeeded", "failed",
         "finishing", "recording", "done")  # fmt: skip


class Pipeline:
    """The policies of one worker process, asked in order."""

    def __init__(self, policies: list[Policy]) -> None:
        self.policies = policies
        # Each hook asks only the policies that override it: most hooks of most policies are the base's no-op, and
        # a step goes through every hook.
        self._hooked = {
            hook: [policy for policy in policies if getattr(type(policy), hook) is not getattr(Policy, hook)]
            for hook in HOOKS
        }

    def find(self, kind: type[P]) -> P | None:
        return next((policy for policy in self.policies if isinstance(policy, kind)), None)

    def starting(self, call: StepCall) -> StepCall:
        for policy in self._hooked["starting"]:
            call = policy.starting(call)
        return call

    def refusal(self, call: StepCall) -> str | None:
        for policy in self._hooked["refusal"]:
            if (reason := policy.refusal(call)) is not None:
                return reason
        return None

    def reading(self, call: StepCall, pipe: RedisPipeline, attempt: Attempt) -> Reader:
        readers: list[tuple[int, int, Reader]] = []
        for policy in self._hooked["reading"]:
            start = len(pipe)
            reader = policy.reading(call, pipe, attempt)
            if reader is not None:
                readers.append((start, len(pipe), reader))

        def read(replies: list[Any]) -> None:
            for start, end, reader in readers:
                reader(replies[start:end])

        return read

    def answer(self, call: StepCall, attempt: Attempt) -> Decision | None:
        for policy in self._hooked["answer"]:
            if (answer := policy.answer(call, attempt)) is not None:
                return answer
        return None

    def admit(self, call: StepCall, attempt: Attempt) -> None:
        for policy in self._hooked["admit"]:
            policy.admit(call, attempt)

    def place(self, call: StepCall, attempt: Attempt) -> str:
        for policy in self._hooked["place"]:
            instance = policy.place(call, attempt)
            if instance is not None:
                return instance
        raise Unavailable(f"no policy places calls to service '{call.service}'")

    def refused(self, call: StepCall, error: Exception) -> Retry | None:
        for policy in self._hooked["refused"]:
            if (retry := policy.refused(call, error)) is not None:
                return retry
        return None

    def attempted(self, call: StepCall, attempt: Attempt, error: Exception | None, seconds: float) -> None:
        for policy in self._hooked["attempted"]:
            policy.attempted(call, attempt, error, seconds)

    def succeeded(self, call: StepCall, attempt: Attempt) -> None:
        for policy in self._hooked["succeeded"]:
            policy.succeeded(call, attempt)

    def failed(self, call: StepCall, error: Exception, attempt: Attempt) -> Decision | Retry | Reroute | None:
        for policy in self._hooked["failed"]:
            decision = policy.failed(call, error, attempt)
            if decision is not None:
                return decision
        return None

    def finishing(self, call: StepCall, result: StepResult) -> StepResult:
        for policy in self._hooked["finishing"]:
            result = policy.finishing(call, result)
        return result

    def recording(self, call: StepCall, result: StepResult, pipe: RedisPipeline, attempt: Attempt) -> None:
        for policy in self._hooked["recording"]:
            policy.recording(call, result, pipe, attempt)

    def done(self, call: StepCall, attempt: Attempt) -> None:
        for policy in self._hooked["done"]:
            policy.done(call, attempt)
