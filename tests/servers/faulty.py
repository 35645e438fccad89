"""An MCP server whose faults the test sets: it reads its mode from a JSON file on every call.

Modes: ok, crash (the process dies mid-call), crash_first (the first `n` calls crash), hang, error
(is_error), slow (answers after `delay`), flaky (crashes on a share `rate` of calls). Every call is
appended to the calls file, so a test can count the MCP traffic that reached the server.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from pathlib import Path
from typing import Any

from mcp.server.mcpserver import MCPServer

STATE = Path(os.environ["FAULTY_STATE"])
CALLS = STATE.with_suffix(".calls")
server = MCPServer("faulty")


@server.tool()
async def work(x: Any = None) -> dict[str, Any]:
    """Do what the state file says."""
    state = json.loads(STATE.read_text()) if STATE.exists() else {"mode": "ok"}
    with CALLS.open("a") as calls:
        calls.write(json.dumps({"x": x, "pid": os.getpid(), "mode": state["mode"]}) + "\n")
    mode = state["mode"]
    if mode == "crash_first":  # crash on the first n calls counted in the calls file, then answer
        mode = "crash" if len(CALLS.read_text().splitlines()) <= state["n"] else "ok"
    if mode == "crash" or (mode == "flaky" and random.random() < state.get("rate", 0.5)):
        os._exit(1)
    if mode == "hang":
        await asyncio.sleep(3600)
    if mode == "error":
        raise RuntimeError("faulty tool error")
    if mode == "slow":
        await asyncio.sleep(state.get("delay", 1.0))
    return {"x": x, "pid": os.getpid()}


if __name__ == "__main__":
    server.run()
