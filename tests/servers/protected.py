"""An MCP server over Streamable HTTP protected by OAuth: it accepts the access tokens an authorization server
(`--issuer`) reports active by introspection (RFC 7662), and serves the protected resource metadata that leads
clients there, through the MCP SDK's own resource-server support. It serves the testing server's echo and sleep."""

from __future__ import annotations

import argparse

import httpx2
import uvicorn
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer
from testing import echo, sleep


class Introspection:
    """A `TokenVerifier` asking the authorization server about each token."""

    def __init__(self, issuer: str) -> None:
        self.endpoint = f"{issuer}/introspect"
        self._client: httpx2.AsyncClient | None = None

    async def verify_token(self, token: str) -> AccessToken | None:
        # One client for all checks: building one per request is slow enough under a fan-out that tokens
        # would expire while their requests wait to be checked.
        self._client = self._client or httpx2.AsyncClient()
        answer = (await self._client.post(self.endpoint, data={"token": token})).json()
        if not answer.get("active"):
            return None
        return AccessToken(token=token, client_id=answer["client_id"], scopes=answer["scope"].split(),
                           expires_at=answer["exp"])  # fmt: skip


def build(port: int, issuer: str) -> MCPServer:
    auth = AuthSettings(issuer_url=issuer, resource_server_url=f"http://127.0.0.1:{port}/mcp", required_scopes=["mcp"])
    server = MCPServer("protected", token_verifier=Introspection(issuer), auth=auth)
    server.add_tool(echo)
    server.add_tool(sleep)
    return server


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--issuer", required=True)
    options = parser.parse_args()
    app = build(options.port, options.issuer).streamable_http_app()
    uvicorn.run(app, host="127.0.0.1", port=options.port, log_level="warning")
