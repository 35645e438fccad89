"""Security events: the one place token issues and revocations, denials, refused messages, secret reads and
changes, key rotations are reported.

Each event is a structured WARNING on the `mcpo.security` logger (the fields also ride on the record as
`security`), so an alerting pipeline can match them; listeners put them on the audit chain and count denials
for alerts (`orchestrator.security.alerts.watch`). Details never hold a token, key or secret value: callers pass
names, ids and reasons only.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("mcpo.security")

Listener = Callable[[str, str, dict[str, Any]], None]
_listeners: list[tuple[str, Listener]] = []  # (key, listener): each key's first listener hears each event
_lock = threading.Lock()


def security_event(kind: str, subject: str, detail: dict[str, Any]) -> None:
    """Report a security event: `kind` (token-issued, token-revoked, permission-denied, call-refused,
    message-refused, secret-set, secret-removed, secret-read, keys-rotated), the subject it concerns (who acted,
    or was refused), and what happened."""
    fields = {"event": kind, "subject": subject, **detail}
    log.warning("security event %s", json.dumps(fields, sort_keys=True, default=str), extra={"security": fields})
    for listener in _distinct():
        try:
            listener(kind, subject, detail)
        except Exception:  # boundary: a failing listener must not turn a denial into a crash
            log.exception("security event listener failed on %s", kind)


def on_security_event(listener: Listener, key: str | None = None) -> None:
    """Call listener(kind, subject, detail) on every security event of this process. Listeners under one key
    are one sink: only the first one still registered hears an event (an embedded orchestrator and its
    in-process worker both watch the same audit chain, which must get each event once)."""
    with _lock:
        _listeners.append((key or f"listener-{id(listener)}", listener))


def off_security_event(listener: Listener) -> None:
    with _lock:
        _listeners[:] = [(key, known) for key, known in _listeners if known is not listener]


def _distinct() -> list[Listener]:
    chosen: dict[str, Listener] = {}
    with _lock:
        for key, listener in _listeners:
            chosen.setdefault(key, listener)
    return list(chosen.values())
