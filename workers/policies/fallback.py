"""The step's fallback service: a call that failed for good moves to that service's queue, keeping its place in
the canvas, with that service's budget."""

from __future__ import annotations

from dataclasses import replace

from orchestrator.messages import StepCall
from workers.pipeline import Attempt, Policy, Reroute


class FallbackService(Policy):
    """Reroutes a call that failed for good to the step's fallback service (once: a fallback has none)."""

    options = ("fallback",)

    def failed(self, call: StepCall, error: Exception, attempt: Attempt) -> Reroute | None:
        if not call.fallback or call.fallback_for:
            return None
        fallback = call.fallback
        return Reroute(replace(
            call, service=fallback["service"], tool=fallback["tool"], arguments=fallback["arguments"],
            timeout=fallback["timeout"], retries=fallback["retries"], attempt=0, deadline=0.0,
            fallback_for={"service": call.service, "tool": call.tool, "arguments": call.arguments},
        ))  # fmt: skip
