"""Example backup MCP server: the reduced monitoring the `fallback` service offers."""

from __future__ import annotations

import time
from typing import Any

from mcp.server.mcpserver import MCPServer

server = MCPServer("safla-backup")


@server.tool()
def basic_monitoring(target: str = "system") -> dict[str, Any]:
    """A basic liveness report, available when the primary service is not."""
    return {"target": target, "status": "up", "source": "safla-backup", "checked_at": time.time()}


if __name__ == "__main__":
    server.run()
