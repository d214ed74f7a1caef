"""OpenID Connect sign-in for the console (issue 17): authorization code + PKCE (S256)
with authlib's client, the ID token checked with the issuer's JWKS (joserfc): signature,
`iss`, `aud`, `exp`, `nonce`. Claims -> role from settings (`OIDC_ROLES`); the session
names the subject and e-mail, which is what the audit rows record.

The flow's state (state, nonce, PKCE verifier, where to go next) travels in a short-lived
signed cookie (`api.cookies`: HttpOnly, Path=/, `__Host-` on https), not in server memory,
so any `serve` process can finish a sign-in another began. HTTP <-> the provider and the
session only.

Bad input is the user's or the provider's, never a 500: a state that does not match
(whatever its characters) or a code the provider refuses (expired, reused, forged:
`invalid_grant`) is a 401 saying to start again; a provider that cannot be reached now
(refused, timed out, answering 5xx) is a 503 naming it, with Retry-After; one that answers
but not as configured (no discovery document at the issuer, one that is not JSON or lacks
an endpoint, a URL httpx2 cannot use, a JWKS that is no key set) is a 500 saying single
sign-on is misconfigured, logged once as an ERROR: waiting will not fix it, an operator
must. `serve` fetches the discovery document once at start (`check_at_start`) and logs a
WARNING when it cannot, never refusing to start for it.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Annotated, Any

import httpx2
from authlib.integrations.httpx_client import AsyncOAuth2Client, OAuthError
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import RedirectResponse, Response
from itsdangerous import BadSignature, URLSafeTimedSerializer
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from api.cookies import FLOW
from api.login import drop_cookie, no_console_for, read_cookie, safe_next, set_cookie, sign_in
from api.problems import problem
from fsm.keys import Principal
from fsm.roles import Role
from fsm.settings import Settings

router = APIRouter(prefix="/ui/oidc", include_in_schema=False)
FLOW_SECONDS = 600
DISCOVERY_SECONDS = 300
RETRY_AFTER = "30"  # seconds: an identity provider's restart
# Every request to the provider is httpx2's, a runtime dependency: authlib's OAuth client
# runs on it (without it, on its deprecated plain-httpx fallback), and the discovery
# document and the key set are fetched with it too, so there is one module's errors.
# What passes: the provider restarting, a network cut, a timeout, a proxy in between.
# (UnsupportedProtocol, LocalProtocolError or InvalidURL are a URL or a request that will
# never work: a configuration error.)
PASSING = (
    httpx2.TimeoutException,
    httpx2.NetworkError,
    httpx2.RemoteProtocolError,
    httpx2.ProxyError,
)
PASSING_STATUSES = frozenset({408, 425, 429})  # and every 5xx
# What the discovery document's fetch can raise: the request's, and its content's.
DISCOVERY_ERRORS = (httpx2.HTTPError, httpx2.InvalidURL, JoseError, KeyError, TypeError, ValueError)
ENDPOINTS = ("authorization_endpoint", "token_endpoint", "jwks_uri")
# a sign-in that went wrong at the provider or in its answer (the ID token's checks)
FAILED = (httpx2.HTTPError, JoseError, KeyError, ValueError)


log = logging.getLogger("order_saga.api")


class Unreachable(Exception):
    """The identity provider did not answer now: it may, later (a 503)."""

    def __init__(self, issuer: str, exc: Exception) -> None:
        super().__init__(
            f"the identity provider {issuer} cannot be reached ({_what(exc)}): "
            "sign in with a key, or try again later"
        )


class Misconfigured(Exception):
    """The identity provider answered, but not as single sign-on is configured: no
    waiting fixes it (a 500, logged once as an ERROR)."""

    def __init__(self, issuer: str, exc: Exception) -> None:
        super().__init__(
            f"single sign-on is misconfigured: the identity provider {issuer} did not give "
            f"a usable discovery document or key set ({_what(exc)}); an operator must fix "
            "ORDER_SAGA_OIDC_ISSUER or the provider. Sign in with a key meanwhile"
        )


def _what(exc: Exception) -> str:
    """What went wrong, in a few words (never a secret: the URLs are the issuer's)."""
    if isinstance(exc, httpx2.HTTPStatusError):
        response = exc.response
        return f"HTTP {response.status_code} from {response.request.url}"
    text = str(exc)
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def passing(exc: Exception) -> bool:
    """True when the provider may well answer later (a 503), False for an error no retry
    fixes (a configuration error)."""
    if isinstance(exc, httpx2.HTTPStatusError):
        status: int = exc.response.status_code
        return status >= 500 or status in PASSING_STATUSES
    return isinstance(exc, PASSING)


@dataclass
class Provider:
    """One issuer: its discovery document and keys, fetched lazily and cached."""

    settings: Settings
    _meta: dict[str, Any] = field(default_factory=dict)
    _keys: KeySet | None = None
    _fetched: float = 0.0
    _logged: str | None = None  # the configuration error last logged (logged once)

    async def meta(self) -> dict[str, Any]:
        """The discovery document (and the JWKS); `Unreachable` when the issuer does not
        answer now, `Misconfigured` when what it answers is of no use."""
        if not self._meta or time.monotonic() - self._fetched > DISCOVERY_SECONDS:
            url = f"{self.settings.oidc_issuer}/.well-known/openid-configuration"
            try:
                async with httpx2.AsyncClient(timeout=self.settings.http_timeout) as client:
                    found = (await client.get(url)).raise_for_status().json()
                    if not isinstance(found, dict):
                        raise TypeError("the discovery document is not a JSON object")
                    for endpoint in ENDPOINTS:
                        if not isinstance(found.get(endpoint), str):
                            raise ValueError(f"no {endpoint} in the discovery document")
                    self._keys = KeySet.import_key_set(
                        (await client.get(found["jwks_uri"])).raise_for_status().json()
                    )
            except DISCOVERY_ERRORS as exc:
                raise self.failure(exc) from exc
            self._meta, self._fetched, self._logged = found, time.monotonic(), None
        return self._meta

    def failure(self, exc: Exception) -> Unreachable | Misconfigured:
        """`exc` of a request to the provider as the error to answer with; a configuration
        error is logged as an ERROR the first time it is seen (not on every sign-in)."""
        issuer = str(self.settings.oidc_issuer)
        if passing(exc):
            return Unreachable(issuer, exc)
        wrong = Misconfigured(issuer, exc)
        if str(wrong) != self._logged:
            self._logged = str(wrong)
            log.error("%s", wrong)
        return wrong

    def client(self, redirect_uri: str) -> AsyncOAuth2Client:
        return AsyncOAuth2Client(
            client_id=self.settings.oidc_client_id,
            client_secret=self.settings.oidc_client_secret,
            scope="openid email profile",
            redirect_uri=redirect_uri,
            code_challenge_method="S256",
            timeout=self.settings.http_timeout,
        )

    def claims(self, id_token: str, nonce: str) -> dict[str, Any]:
        """The ID token's claims once signature, issuer, audience, expiry and nonce hold."""
        assert self._keys is not None
        token = jwt.decode(id_token, self._keys, algorithms=["RS256", "ES256", "PS256"])
        issuer = str(self._meta.get("issuer") or self.settings.oidc_issuer)
        registry = jwt.JWTClaimsRegistry(
            leeway=30,
            iss={"essential": True, "value": issuer},
            aud={"essential": True, "value": str(self.settings.oidc_client_id)},
            sub={"essential": True},
            exp={"essential": True},
            nonce={"essential": True, "value": nonce},
        )
        registry.validate(token.claims)
        return dict(token.claims)

    def role_of(self, claims: dict[str, Any]) -> Role | None:
        value = claims.get(self.settings.oidc_role_claim)
        values = value if isinstance(value, list) else [value] if value is not None else []
        roles = [Role(self.settings.oidc_roles[v]) for v in map(str, values)
                 if v in self.settings.oidc_roles]  # fmt: skip
        if roles:
            return max(roles, key=list(Role).index)
        default = self.settings.oidc_default_role
        return Role(default) if default else None


def _flow_signer(request: Request) -> URLSafeTimedSerializer:
    sessions = request.app.state.authenticator.sessions
    return URLSafeTimedSerializer(sessions.signer.secret_key, salt="order-saga oidc flow")


def _provider(request: Request) -> Provider:
    provider: Provider | None = getattr(request.app.state, "oidc", None)
    if provider is None:
        raise HTTPException(404, "OpenID Connect is not configured (ORDER_SAGA_OIDC_ISSUER)")
    return provider


def _callback(request: Request) -> str:
    return str(request.url_for("oidc_callback"))


def _unreachable(exc: Unreachable | Misconfigured) -> Response:
    if isinstance(exc, Misconfigured):
        return problem(500, str(exc), code="sso_misconfigured", dependency="identity provider")
    return problem(
        503,
        str(exc),
        code="identity_provider_unavailable",
        headers={"Retry-After": RETRY_AFTER},
        dependency="identity provider",
    )


async def check_at_start(provider: Provider) -> None:
    """`serve`'s start: fetch the discovery document once, so a provider that cannot be
    reached is a WARNING in the log at once, not a surprise at the first sign-in (and a
    misconfigured one `meta`'s ERROR). Never stops the start: keys still sign in."""
    try:
        await provider.meta()
    except Unreachable as exc:
        log.warning("single sign-on: %s", exc)
    except Misconfigured:
        pass  # logged by `meta`, as an ERROR


@router.get("/login")
async def oidc_login(request: Request, next: Annotated[str, Query()] = "/ui") -> Response:
    """Off to the provider: authorization code flow with PKCE, state and nonce."""
    provider = _provider(request)
    try:
        meta = await provider.meta()
    except (Unreachable, Misconfigured) as exc:
        return _unreachable(exc)
    verifier = secrets.token_urlsafe(48)
    state, nonce = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    async with provider.client(_callback(request)) as client:
        url, _ = client.create_authorization_url(
            meta["authorization_endpoint"], state=state, code_verifier=verifier, nonce=nonce
        )
    flow = _flow_signer(request).dumps({"s": state, "n": nonce, "v": verifier, "x": next})
    response = RedirectResponse(url, status_code=302)
    set_cookie(request, response, FLOW, flow, FLOW_SECONDS)
    return response


@router.get("/callback", name="oidc_callback")
async def oidc_callback(
    request: Request,
    code: Annotated[str | None, Query(max_length=2000)] = None,
    state: Annotated[str | None, Query(max_length=200)] = None,
    error: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    """Back from the provider: check state, trade the code (with the PKCE verifier) for
    tokens, check the ID token, map its claims to a role, sign in."""
    provider = _provider(request)
    if error:
        raise HTTPException(401, f"the identity provider refused: {error}")
    try:
        flow = _flow_signer(request).loads(read_cookie(request, FLOW), max_age=FLOW_SECONDS)
    except BadSignature:
        raise HTTPException(401, "no sign-in in progress (or it expired): start again") from None
    # bytes: compare_digest refuses a str that is not ASCII (TypeError, a 500)
    if not code or not state or not secrets.compare_digest(state.encode(), str(flow["s"]).encode()):
        raise HTTPException(401, "the sign-in's state does not match: start again")
    try:
        meta = await provider.meta()
        async with provider.client(_callback(request)) as client:
            tokens = await client.fetch_token(
                meta["token_endpoint"], code=code, code_verifier=flow["v"]
            )
        claims = provider.claims(str(tokens["id_token"]), str(flow["n"]))
    except (Unreachable, Misconfigured) as exc:
        return _unreachable(exc)
    except (httpx2.TransportError, httpx2.InvalidURL) as exc:  # the token endpoint: no answer
        return _unreachable(provider.failure(exc))
    except OAuthError as exc:  # the provider refused the code: expired, used, not its own
        raise HTTPException(
            401, f"the identity provider refused the sign-in ({exc.error}): start again"
        ) from None
    except FAILED as exc:
        raise HTTPException(401, f"sign-in failed: {type(exc).__name__}") from None
    role = provider.role_of(claims)
    if role is None:
        raise HTTPException(403, "signed in, but no role is mapped for this account")
    email = claims.get("email")
    principal = Principal(
        name=str(claims["sub"]), role=role, kind="oidc", email=str(email) if email else None
    )
    refused = no_console_for(principal)
    if refused is not None:
        raise HTTPException(403, f"signed in, but {refused}")
    response = sign_in(request, principal, safe_next(str(flow.get("x", "/ui"))))
    drop_cookie(request, response, FLOW)
    return response
