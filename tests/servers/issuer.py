"""A small OAuth 2.1 authorization server: the client_credentials grant, short-lived tokens, introspection.

It serves its RFC 8414 metadata, issues opaque access tokens living `--lifetime` seconds to the one client it
knows (`--client-id`, its secret in the file `--secret-file`), answers RFC 7662 introspection for the MCP
server that checks them, and counts token requests at `/stats`, so a test can see how often the fleet asked.
"""

from __future__ import annotations

import argparse
import base64
import math
import secrets
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


class Issuer:
    def __init__(self, base: str, client_id: str, secret: str, lifetime: int) -> None:
        self.base = base
        self.client_id = client_id
        self.secret = secret
        self.lifetime = lifetime
        self.tokens: dict[str, float] = {}  # token -> expiry
        self.token_requests = 0
        self.refused = 0

    async def metadata(self, request: Request) -> JSONResponse:
        return JSONResponse({
            "issuer": self.base, "authorization_endpoint": f"{self.base}/authorize",
            "token_endpoint": f"{self.base}/token", "introspection_endpoint": f"{self.base}/introspect",
            "grant_types_supported": ["client_credentials"], "scopes_supported": ["mcp"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        })  # fmt: skip

    async def token(self, request: Request) -> JSONResponse:
        self.token_requests += 1
        form = await request.form()
        client_id, secret = self._client(request, dict(form))
        if client_id != self.client_id or not secrets.compare_digest(secret, self.secret):
            self.refused += 1
            return JSONResponse({"error": "invalid_client"}, status_code=401)
        if form.get("grant_type") != "client_credentials":
            return JSONResponse({"error": "unsupported_grant_type"}, status_code=400)
        token = secrets.token_urlsafe(24)
        self.tokens[token] = math.ceil(time.time() + self.lifetime)  # introspection reports whole seconds
        return JSONResponse({"access_token": token, "token_type": "Bearer", "expires_in": self.lifetime,
                             "scope": form.get("scope") or "mcp"})  # fmt: skip

    async def introspect(self, request: Request) -> JSONResponse:
        token = str((await request.form()).get("token", ""))
        expiry = self.tokens.get(token)
        if expiry is None or time.time() >= expiry:
            return JSONResponse({"active": False})
        return JSONResponse({"active": True, "client_id": self.client_id, "scope": "mcp", "exp": int(expiry)})

    async def forget(self, request: Request) -> JSONResponse:
        """Revoke every token issued so far, as an authorization server that lost its state would."""
        self.tokens.clear()
        return JSONResponse({"forgotten": True})

    async def stats(self, request: Request) -> JSONResponse:
        return JSONResponse({"token_requests": self.token_requests, "refused": self.refused,
                             "issued": len(self.tokens)})  # fmt: skip

    def _client(self, request: Request, form: dict[str, Any]) -> tuple[str, str]:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "basic":
            client_id, _, secret = base64.b64decode(value).decode().partition(":")
            return unquote(client_id), unquote(secret)
        return str(form.get("client_id", "")), str(form.get("client_secret", ""))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--secret-file", type=Path, required=True)
    parser.add_argument("--lifetime", type=int, default=3)
    options = parser.parse_args()
    base = f"http://127.0.0.1:{options.port}"
    issuer = Issuer(base, options.client_id, options.secret_file.read_text().strip(), options.lifetime)
    app = Starlette(routes=[
        Route("/.well-known/oauth-authorization-server", issuer.metadata),
        Route("/token", issuer.token, methods=["POST"]),
        Route("/introspect", issuer.introspect, methods=["POST"]),
        Route("/forget", issuer.forget, methods=["POST"]),
        Route("/stats", issuer.stats),
    ])  # fmt: skip
    uvicorn.run(app, host="127.0.0.1", port=options.port, log_level="warning")
