"""A real, small OpenID provider for the tests (issue 17): discovery, JWKS, an authorize
page with a "Continue as …" button, and a token endpoint that checks the client secret,
the redirect URI and the PKCE (S256) verifier before it issues an RS256 ID token signed
with joserfc. Served on 127.0.0.1 by `LiveServer`; nothing in it is mocked.
"""

from __future__ import annotations

import base64
import hashlib
import html
import secrets
import time
from dataclasses import dataclass, field
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import FastAPI, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from joserfc import jwt
from joserfc.jwk import RSAKey

CLIENT_ID = "order-saga-console"
CLIENT_SECRET = "test-client-secret"


@dataclass
class User:
    sub: str
    email: str
    groups: list[str]


@dataclass
class Provider:
    issuer: str = ""
    user: User = field(default_factory=lambda: User("alice-0001", "alice@example.com", []))
    key: RSAKey = field(default_factory=lambda: RSAKey.generate_key(2048, {"kid": "test-1"}))
    codes: dict[str, dict[str, Any]] = field(default_factory=dict)
    tokens_issued: int = 0
    # A provider answering wrongly: fields of its discovery document replaced (None: left
    # out), or the status its discovery answers with instead of the document.
    changes: dict[str, Any] = field(default_factory=dict)
    discovery_status: int = 200


def _s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _client(request: Request, client_id: str | None, client_secret: str | None) -> None:
    auth = request.headers.get("authorization", "")
    if auth.startswith("Basic "):
        client_id, _, client_secret = base64.b64decode(auth[6:]).decode().partition(":")
    if client_id != CLIENT_ID or client_secret != CLIENT_SECRET:
        raise HTTPException(401, "invalid_client")


def provider_app(provider: Provider) -> FastAPI:
    app = FastAPI()

    @app.get("/.well-known/openid-configuration")
    def discovery() -> Any:
        if provider.discovery_status != 200:
            return JSONResponse({"error": "not now"}, status_code=provider.discovery_status)
        document = {
            "issuer": provider.issuer,
            "authorization_endpoint": f"{provider.issuer}/authorize",
            "token_endpoint": f"{provider.issuer}/token",
            "jwks_uri": f"{provider.issuer}/jwks",
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        }
        document |= provider.changes
        return {k: v for k, v in document.items() if v is not None}

    @app.get("/jwks")
    def jwks() -> dict[str, Any]:
        return {"keys": [provider.key.as_dict(private=False)]}

    @app.get("/authorize", response_class=HTMLResponse)
    def authorize(
        response_type: str,
        client_id: str,
        redirect_uri: str,
        state: str,
        nonce: str,
        code_challenge: str,
        code_challenge_method: Annotated[str, Query()],
        scope: str = "",
    ) -> str:
        if response_type != "code" or client_id != CLIENT_ID or "openid" not in scope.split():
            raise HTTPException(400, "invalid_request")
        if code_challenge_method != "S256":
            raise HTTPException(400, "PKCE S256 required")
        code = secrets.token_urlsafe(16)
        provider.codes[code] = {
            "redirect_uri": redirect_uri,
            "nonce": nonce,
            "challenge": code_challenge,
            "state": state,
        }
        who = html.escape(provider.user.email)
        return (
            "<!doctype html><title>Test IdP</title>"
            '<form method="post" action="/approve">'
            f'<input type="hidden" name="code" value="{code}">'
            f"<button type=submit>Continue as {who}</button></form>"
        )

    @app.post("/approve")
    def approve(code: Annotated[str, Form()]) -> RedirectResponse:
        grant = provider.codes[code]
        query = urlencode({"code": code, "state": grant["state"]})
        return RedirectResponse(f"{grant['redirect_uri']}?{query}", status_code=303)

    @app.post("/token")
    def token(
        request: Request,
        grant_type: Annotated[str, Form()],
        code: Annotated[str, Form()],
        redirect_uri: Annotated[str, Form()],
        code_verifier: Annotated[str, Form()],
        client_id: Annotated[str | None, Form()] = None,
        client_secret: Annotated[str | None, Form()] = None,
    ) -> JSONResponse:
        _client(request, client_id, client_secret)
        grant = provider.codes.pop(code, None)  # one use only
        if grant_type != "authorization_code" or grant is None:
            return JSONResponse({"error": "invalid_grant"}, status_code=400)
        if grant["redirect_uri"] != redirect_uri or _s256(code_verifier) != grant["challenge"]:
            return JSONResponse({"error": "invalid_grant"}, status_code=400)
        now = int(time.time())
        claims = {
            "iss": provider.issuer,
            "sub": provider.user.sub,
            "aud": CLIENT_ID,
            "iat": now,
            "exp": now + 300,
            "nonce": grant["nonce"],
            "email": provider.user.email,
            "groups": provider.user.groups,
        }
        id_token = jwt.encode({"alg": "RS256", "kid": "test-1"}, claims, provider.key)
        provider.tokens_issued += 1
        return JSONResponse(
            {
                "access_token": secrets.token_urlsafe(16),
                "token_type": "Bearer",
                "expires_in": 300,
                "id_token": id_token,
            }
        )

    return app
