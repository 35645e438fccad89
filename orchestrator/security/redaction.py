"""Redaction of secrets in log output: the last line of defence, after every sink has been kept clean by design.

A logging filter on the handlers of workers and the CLI rewrites each record (message, arguments, traceback,
stack) before it is written: values this process knows to be secret (vault values it read, sensitive data it
opened), bearer and basic credentials, JWTs and the values of `Authorization`, cookie and API-key headers are
replaced by `[redacted]`. It runs on every record that reaches a handler, DEBUG included.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable
from typing import Any

REDACTED = "[redacted]"
SHORTEST = 8  # shorter values would redact ordinary words; a secret is longer than this
KEEP = 1024  # known values kept, the oldest forgotten first: a long-lived worker must not grow without bound

PATTERNS = (
    # `Authorization: Bearer x`, `"cookie": "x"`, `(b'authorization', b'x')`: the header's name stays.
    re.compile(
        r"(?i)((?:proxy-)?authorization|set-cookie|cookie|x-api-key|api-key)"
        r"(['\"]?\s*[:=,]\s*(?:b?['\"])?)([^'\"\r\n]+)"
    ),
    re.compile(r"(?i)\b(bearer|basic)(\s+)([A-Za-z0-9._~+/=-]{6,})"),
    re.compile(r"()()\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"),  # a JWT: header.payload.signature
)

CUES = ("authorization", "cookie", "api-key", "bearer", "basic", "eyj")  # a line that PATTERNS can match holds one


class Known:
    """The secret values this process holds, matched as one regular expression rebuilt when they change."""

    def __init__(self) -> None:
        self._values: dict[str, None] = {}  # insertion-ordered: the oldest first
        self._pattern: re.Pattern[str] | None = None
        self._lock = threading.Lock()

    def add(self, value: str) -> None:
        if len(value) < SHORTEST or value in self._values:
            return
        with self._lock:
            self._values[value] = None
            while len(self._values) > KEEP:
                del self._values[next(iter(self._values))]
            self._pattern = None

    def pattern(self) -> re.Pattern[str] | None:
        pattern = self._pattern
        if pattern is None and self._values:
            with self._lock:
                values = sorted(self._values, key=len, reverse=True)  # the longest first: no partial matches
                pattern = self._pattern = re.compile("|".join(map(re.escape, values)))
        return pattern


KNOWN = Known()


def remember(value: str) -> None:
    """Redact value from every log line from now on (a secret this process read)."""
    KNOWN.add(value)


def remember_all(value: Any) -> None:
    """Remember every string in a JSON value (opened sensitive data)."""
    for text in _strings(value):
        KNOWN.add(text)


def redact(text: str) -> str:
    """The text with known secrets and credential-shaped values replaced."""
    known = KNOWN.pattern()
    if known is not None:
        text = known.sub(REDACTED, text)
    lower = text.lower()
    if any(word in lower for word in CUES):  # most lines hold none: the patterns would scan them for nothing
        for pattern in PATTERNS:
            text = pattern.sub(lambda match: f"{match.group(1)}{match.group(2)}{REDACTED}", text)
    return text


class RedactingFilter(logging.Filter):
    """Rewrites a record's message, traceback and stack with secrets redacted; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # arguments that do not fit the format: the handler will say so
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            # Formatters reuse exc_text when it is set: the traceback is formatted once, here, redacted.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


FILTER = RedactingFilter()


def install(*loggers: logging.Logger) -> None:
    """Put the filter on every handler of the root logger, of the given loggers and on logging's last resort
    (what writes when no handler is configured); idempotent."""
    handlers = [handler for logger in (logging.getLogger(), *loggers) for handler in logger.handlers]
    for handler in [*handlers, logging.lastResort]:
        if handler is not None and FILTER not in handler.filters:
            handler.addFilter(FILTER)


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
