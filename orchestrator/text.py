"""Text read back from Redis: redis-py answers bytes unless a client decodes responses, which ours do not (callers
may pass their own client), so a key or field written as str may come back as either."""

from __future__ import annotations


def as_text(value: bytes | str) -> str:
    """value as str, decoding bytes as UTF-8."""
    return value.decode() if isinstance(value, bytes) else str(value)
