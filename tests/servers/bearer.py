"""An MCP server over Streamable HTTP that requires a bearer token; it serves the testing server's echo and sleep.

The valid tokens are the lines of a file (`--tokens PATH`), read on every request, so a test can make it
accept old and new tokens during a grace window and then only the new one. Refused requests are counted
in `PATH.refused` (one line each), so a test can see that refusals happened without seeing the tokens.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import uvicorn
from mcp.server.mcpserver import MCPServer
from testing import echo, sleep

server = MCPServer("bearer")
server.add_tool(echo)
server.add_tool(sleep)


class RequireBearer:
    """ASGI middleware: 401 unless `Authorization: Bearer <token>` names a token in the file."""

    def __init__(self, app: Any, tokens: Path) -> None:
        self.app = app
        self.tokens = tokens

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self._authorized(dict(scope["headers"]).get(b"authorization", b"")):
            await self.app(scope, receive, send)
            return
        with self.tokens.with_suffix(".refused").open("a") as refused:
            refused.write("refused\n")
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"text/plain"), (b"www-authenticate", b"Bearer")]})  # fmt: skip
        await send({"type": "http.response.body", "body": b"unauthorized"})

    def _authorized(self, header: bytes) -> bool:
        scheme, _, token = header.decode(errors="replace").partition(" ")
        valid = {line.strip() for line in self.tokens.read_text().splitlines() if line.strip()}
        return scheme.lower() == "bearer" and token in valid


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", type=Path, required=True)
    options = parser.parse_args()
    app = RequireBearer(server.streamable_http_app(), options.tokens)
    uvicorn.run(app, host="127.0.0.1", port=options.port, log_level="warning")
