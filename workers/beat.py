"""The health beat schedule: celery beat sends one health task per service, at the service's interval, to
that service's own queue, where a worker checks each of the service's instances.

One task per service rather than per instance: instances registered at run time join without a change
to the schedule, and one worker checks them all at once over its pooled sessions.
"""

from __future__ import annotations

from typing import Any

from orchestrator.config import Config
from workers.app import queue_for


def schedule(config: Config) -> dict[str, dict[str, Any]]:
    """celery beat's `beat_schedule` for a configuration."""
    return {
        f"health:{name}": {
            "task": "mcpo.health",
            "schedule": service.health.interval,
            "args": (name,),
            # A beat older than its interval says nothing new: drop it rather than pile up behind a backlog.
            "options": {"queue": queue_for(name), "expires": service.health.interval},
        }
        for name, service in sorted(config.services.items())
        if service.health.enabled
    }
