"""Lua scripts that ride in a step's pipelines, sent by their SHA alone.

redis-py checks every script a pipeline carries with a SCRIPT EXISTS round trip before each execute, and an
EVAL sends the script's text every time; the breaker's scripts go in two pipelines of every step, so both
cost more than the scripts themselves. Here a pipeline carries a bare EVALSHA, and `execute` answers a
server that lost the script (a restart, SCRIPT FLUSH) by loading it and sending that command alone again:
the pipeline's other commands are not repeated.
"""

from __future__ import annotations

import hashlib
from typing import Any

from redis import Redis
from redis.client import Pipeline
from redis.exceptions import NoScriptError

_SOURCES: dict[str, str] = {}  # sha -> source, for every script made here


class Lua:
    """One script, known by its SHA."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        _SOURCES[self.sha] = source

    def queue(self, pipe: Pipeline, keys: list[str], args: list[Any]) -> None:
        """Queue the script on `pipe`; execute the pipe with `execute` below."""
        pipe.evalsha(self.sha, len(keys), *keys, *args)


def execute(pipe: Pipeline) -> list[Any]:
    """Execute a pipeline (not a transaction) as `pipe.execute()` does, loading and resending any of its
    scripts the server lacks."""
    commands = list(pipe.command_stack)
    replies = pipe.execute(raise_on_error=False)
    for i, reply in enumerate(replies):
        if isinstance(reply, NoScriptError):
            _, sha, count, *rest = commands[i][0]  # ("EVALSHA", sha, number of keys, keys..., args...)
            client = Redis(connection_pool=pipe.connection_pool)
            client.script_load(_SOURCES[sha])
            replies[i] = client.evalsha(sha, count, *rest)
        elif isinstance(reply, Exception):
            raise reply
    return replies
