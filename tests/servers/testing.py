"""An MCP server for tests: echoes, fails, sleeps, crashes and reports its environment on demand."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from typing import Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations

server = MCPServer("testing")
_in_flight = {"now": 0, "max": 0}
_cancelled: list[str] = []


@server.tool()
def echo(value: Any = None, label: str = "") -> dict[str, Any]:
    """Answer with what was sent, and this server's process id."""
    return {"value": value, "label": label, "pid": os.getpid()}


@server.tool()
def fail(message: str = "tool failed on purpose") -> str:
    """Always fail: the result carries is_error."""
    raise ValueError(message)


@server.tool()
def reject(value: Any = None) -> str:
    """Fail with an error that quotes the arguments it was given, as careless servers do (a ToolError's message
    reaches the client)."""
    raise ToolError(f"rejected arguments: value={value!r}")


@server.tool()
async def sleep(seconds: float = 0.05) -> dict[str, float]:
    """Sleep, then answer."""
    await asyncio.sleep(seconds)
    return {"slept": seconds}


@server.tool()
async def concurrent(seconds: float = 0.5) -> dict[str, int]:
    """Sleep while counting the calls in flight at once; answers the highest count seen so far."""
    _in_flight["now"] += 1
    _in_flight["max"] = max(_in_flight["max"], _in_flight["now"])
    try:
        await asyncio.sleep(seconds)
    finally:
        _in_flight["now"] -= 1
    return {"max_in_flight": _in_flight["max"], "pid": os.getpid()}


@server.tool()
def register(name: str) -> str:
    """Add a tool at run time: a client that caches tool lists would not see it."""
    server.add_tool(lambda: name, name=name, description=f"added at run time: {name}")
    return name


@server.tool()
async def hang(tag: str = "", seconds: float = 3600) -> str:
    """Hang until cancelled (or for `seconds`); a cancelled call is remembered by its tag."""
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        _cancelled.append(tag)
        raise
    return tag


@server.tool()
def cancelled() -> list[str]:
    """Tags of the `hang` calls the client cancelled."""
    return _cancelled


@server.tool()
def crash() -> str:
    """Kill this server process mid-call: a transport fault for the client."""
    os._exit(3)


@server.tool()
async def tally(path: str, tag: str = "call", seconds: float = 0, value: Any = None) -> dict[str, Any]:
    """Append `tag` as a line to the file at `path` (a test counts the calls a fault made twice), sleep `seconds`,
    then answer with the tag and `value`."""
    with open(path, "a") as ledger:
        ledger.write(f"{tag}\n")
    await asyncio.sleep(seconds)
    return {"tag": tag, "value": value}


@server.tool()
def flaky(path: str, tag: str, failures: int = 1) -> str:
    """Append `tag` as a line to the file at `path`, and fail while the file holds it `failures` times or fewer:
    a call that succeeds once retried."""
    with open(path, "a") as ledger:
        ledger.write(f"{tag}\n")
    with open(path) as ledger:
        seen = ledger.read().split().count(tag)
    if seen <= failures:
        raise ToolError(f"{tag} fails (call {seen} of {failures + 1})")
    return tag


@server.tool(annotations=ToolAnnotations(read_only_hint=True))
async def lookup(path: str, key: str, seconds: float = 0) -> dict[str, Any]:
    """A read-only lookup: append `key` as a line to the file at `path` (a test counts the calls that reached this
    server), sleep `seconds`, then answer with the key and this server's clock."""
    with open(path, "a") as ledger:
        ledger.write(f"{key}\n")
    await asyncio.sleep(seconds)
    return {"key": key, "at": time.time()}


@server.tool()
def stamp(path: str) -> float:
    """Append this server's clock (epoch seconds) as a line to the file at `path`: when each call reached it."""
    now = time.time()
    with open(path, "a") as ledger:
        ledger.write(f"{now!r}\n")
    return now


@server.tool()
def getenv(name: str) -> dict[str, str | None]:
    """One environment variable of this server process."""
    return {"name": name, "value": os.environ.get(name)}


@server.tool()
def shout(lines: int = 1000) -> int:
    """Write many lines to stderr: a client that does not drain it would block here."""
    for i in range(lines):
        print(f"stderr line {i} " + "x" * 200, file=sys.stderr)
    return lines


@server.tool()
def meta(ctx: Context) -> dict[str, Any]:
    """The `_meta` of this request as the server received it (the orchestrator's idempotency key among it)."""
    return dict(ctx.request_context.meta or {})


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--http", type=int, metavar="PORT")
    options = parser.parse_args()
    if options.http:
        server.run("streamable-http", host="127.0.0.1", port=options.http)
    else:
        server.run()
