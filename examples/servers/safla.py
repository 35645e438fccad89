"""Example SAFLA-style MCP server: deployment and health tools.

Run over stdio (default) or Streamable HTTP: ``python safla.py --http 8765``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from typing import Any

from mcp.server.mcpserver import MCPServer

server = MCPServer("safla")
_deployments: dict[str, dict[str, Any]] = {}


@server.tool()
def deploy_safla_instance(
    instance_name: str = "safla", environment: str = "development", config_overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Deploy a SAFLA instance into an environment."""
    deployment = {
        "deployment_id": uuid.uuid4().hex[:12],
        "instance_name": instance_name,
        "environment": environment,
        "config_overrides": config_overrides or {},
        "status": "deployed",
        "server_pid": os.getpid(),
    }
    _deployments[deployment["deployment_id"]] = deployment
    return deployment


@server.tool()
def monitor_system_health(deployment_id: str | None = None) -> dict[str, Any]:
    """Report the health of the system, or of one deployment."""
    known = deployment_id is None or deployment_id in _deployments
    return {
        "healthy": known,
        "deployment_id": deployment_id,
        "deployments": len(_deployments),
        "checked_at": time.time(),
    }


@server.tool()
async def sleep(seconds: float = 0.05) -> dict[str, float]:
    """Sleep, then answer: an I/O-bound tool for load tests."""
    await asyncio.sleep(seconds)
    return {"slept": seconds}


@server.tool()
async def noop() -> str:
    """Do nothing: a tool for measuring overhead."""
    # async: the SDK runs a plain function on a worker thread, which costs more than the call itself.
    return "ok"


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--http", type=int, metavar="PORT", help="serve Streamable HTTP on this port")
    options = parser.parse_args()
    if options.http:
        server.run("streamable-http", host="127.0.0.1", port=options.http)
    else:
        server.run()
