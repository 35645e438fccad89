"""A small OAuth 2.1 authorization server issuing short-lived tokens, with introspection.

It serves its RFC 8414 metadata and issues opaque access tokens living `--lifetime` seconds to the one client
it knows (`--client-id`), which authenticates with its secret (the file `--secret-file`; basic or post) or
with a JWT assertion signed by the key whose public half is `--public-key` (private_key_jwt, RFC 7523 §2.2).
Grants: client_credentials, and jwt-bearer (RFC 7523 §2.1) with an identity assertion (an ID-JAG, SEP-990)
signed by that same key, standing in for the enterprise IdP's. It answers RFC 7662 introspection for the MCP
server that checks the tokens, and counts token requests by grant at `/stats`, so a test can see how often
the fleet asked.
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

import jwt
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


class Issuer:
    def __init__(self, base: str, client_id: str, secret: str, lifetime: int, public_key: str | None) -> None:
        self.base = base
        self.public_key = public_key
        self.client_id = client_id
        self.secret = secret
        self.lifetime = lifetime
        self.tokens: dict[str, float] = {}  # token -> expiry
        self.token_requests = 0
        self.refused = 0
        self.grants: dict[str, int] = {}

    async def metadata(self, request: Request) -> JSONResponse:
        return JSONResponse({
            "issuer": self.base, "authorization_endpoint": f"{self.base}/authorize",
            "token_endpoint": f"{self.base}/token", "introspection_endpoint": f"{self.base}/introspect",
            "grant_types_supported": ["client_credentials", JWT_BEARER], "scopes_supported": ["mcp"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "private_key_jwt"],
        })  # fmt: skip

    async def token(self, request: Request) -> JSONResponse:
        self.token_requests += 1
        form = {key: str(value) for key, value in (await request.form()).items()}
        if not self._authenticated(request, form):
            self.refused += 1
            return JSONResponse({"error": "invalid_client"}, status_code=401)
        grant = form.get("grant_type", "")
        if grant == JWT_BEARER and not self._verified(form.get("assertion", "")):
            self.refused += 1
            return JSONResponse({"error": "invalid_grant"}, status_code=400)
        if grant not in ("client_credentials", JWT_BEARER):
            return JSONResponse({"error": "unsupported_grant_type"}, status_code=400)
        method = "private_key_jwt" if "client_assertion" in form else "client_secret"
        key = f"{grant} {method}"
        self.grants[key] = self.grants.get(key, 0) + 1
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
                             "issued": len(self.tokens), "grants": self.grants})  # fmt: skip

    def _authenticated(self, request: Request, form: dict[str, str]) -> bool:
        if form.get("client_assertion_type") == ASSERTION_TYPE:
            claims = self._verified(form.get("client_assertion", ""))
            return claims is not None and claims.get("iss") == claims.get("sub") == self.client_id
        client_id, secret = self._client(request, form)
        return client_id == self.client_id and secrets.compare_digest(secret, self.secret)

    def _verified(self, assertion: str) -> dict[str, Any] | None:
        """The claims of a JWT signed by the known key for this issuer, else None."""
        if self.public_key is None:
            return None
        try:
            claims: dict[str, Any] = jwt.decode(assertion, self.public_key, algorithms=["RS256"], audience=self.base)
        except jwt.PyJWTError:
            return None
        return claims

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
    parser.add_argument("--public-key", type=Path)
    options = parser.parse_args()
    base = f"http://127.0.0.1:{options.port}"
    public_key = options.public_key.read_text() if options.public_key else None
    issuer = Issuer(base, options.client_id, options.secret_file.read_text().strip(), options.lifetime, public_key)
    app = Starlette(routes=[
        Route("/.well-known/oauth-authorization-server", issuer.metadata),
        Route("/token", issuer.token, methods=["POST"]),
        Route("/introspect", issuer.introspect, methods=["POST"]),
        Route("/forget", issuer.forget, methods=["POST"]),
        Route("/stats", issuer.stats),
    ])  # fmt: skip
    uvicorn.run(app, host="127.0.0.1", port=options.port, log_level="warning")
