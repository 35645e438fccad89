"""Security events: the one place token issues and revocations, denials and refused messages are reported.

Each event is a structured WARNING on the `mcpo.security` logger (the fields also ride on the record as
`security`), so an alerting pipeline can match them; the audit chain hooks in here to record them too.
Details never hold a token or key: callers pass names, ids and reasons only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("mcpo.security")

Listener = Callable[[str, str, dict[str, Any]], None]
_listeners: list[Listener] = []


def security_event(kind: str, subject: str, detail: dict[str, Any]) -> None:
    """Report a security event: `kind` (token-issued, token-revoked, permission-denied, call-refused, …), the
    subject it concerns, and what happened."""
    fields = {"event": kind, "subject": subject, **detail}
    log.warning("security event %s", json.dumps(fields, sort_keys=True, default=str), extra={"security": fields})
    for listener in list(_listeners):
        try:
            listener(kind, subject, detail)
        except Exception:  # boundary: a failing listener must not turn a denial into a crash
            log.exception("security event listener failed on %s", kind)


def on_security_event(listener: Listener) -> None:
    """Call listener(kind, subject, detail) on every security event of this process (the audit chain's hook)."""
    _listeners.append(listener)


def off_security_event(listener: Listener) -> None:
    if listener in _listeners:
        _listeners.remove(listener)
