"""Signing in to the console (issue 17): /ui/login with a key, /ui/logout, and the CSRF
check every console form goes through. OpenID Connect lives in `api.oidc`.

A successful sign-in sets the session cookie (`api.session`): signed, HttpOnly,
SameSite=Lax, with an expiry, and Secure unless ORDER_SAGA_COOKIE_SECURE=false or (when
unset) the console is reached as plain http on 127.0.0.1/localhost. A sign-in form posted
from another site is refused (login CSRF: it would sign the victim's browser in as the
attacker's key). HTTP <-> the authenticator and the session signer only; who may see what
stays in `api.access`.
"""

from __future__ import annotations

import hmac
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from api.access import ROUTES
from api.auth import Authenticator
from api.session import COOKIE, Session
from fsm.keys import Principal
from fsm.settings import Settings

router = APIRouter(prefix="/ui", include_in_schema=False)
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
DEFAULT_PORTS = {"http": 80, "https": 443}


def _authenticator(request: Request) -> Authenticator:
    found: Authenticator = request.app.state.authenticator
    return found


def safe_next(target: str | None) -> str:
    """Only a path on this site (never //evil.example or a scheme): an open redirect
    would turn the login page into a phishing hop."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/ui"


def secure_cookie(settings: Settings, request: Request) -> bool:
    if settings.cookie_secure is not None:
        return settings.cookie_secure
    return request.url.scheme == "https" or request.url.hostname not in LOCAL_HOSTS


def sign_in(request: Request, principal: Principal, target: str) -> Response:
    """Set the session cookie for `principal` and go to `target`."""
    auth = _authenticator(request)
    assert auth.sessions is not None
    bound = auth.token_fingerprint() if principal.kind == "token" else None
    cookie, _ = auth.sessions.issue(principal, bound=bound)
    settings: Settings = request.app.state.settings
    response = RedirectResponse(safe_next(target), status_code=303)
    response.set_cookie(
        COOKIE,
        cookie,
        max_age=settings.session_seconds,
        httponly=True,
        samesite="lax",
        secure=secure_cookie(settings, request),
        path="/",
    )
    return response


def from_elsewhere(request: Request) -> bool:
    """Was this form posted from another site? A browser names where from: Origin, or a
    Referer when it leaves Origin out; neither (a script, curl) is no browser to abuse.
    The site is compared by host and port with the Host the request was sent to, not by
    scheme: behind a proxy that ends TLS, the app itself is reached over plain http."""
    origin = request.headers.get("origin") or request.headers.get("referer")
    if origin is None:
        return False
    try:
        sent_from = urlsplit(origin)
        sent_to = urlsplit(f"//{request.headers.get('host', '')}")
        default = DEFAULT_PORTS.get(sent_from.scheme)
        return not (
            sent_from.hostname is not None
            and sent_from.hostname == sent_to.hostname
            and (sent_from.port or default) == (sent_to.port or default)
        )
    except ValueError:  # a port that is not a number
        return True


def no_console_for(principal: Principal) -> str | None:
    """Why `principal` may not use the console (its role may not open /ui, per
    `api.access`), else None: refused at sign-in, not with a cookie that opens nothing."""
    console = ROUTES[("GET", "/ui")]
    if console.admits(principal.role):
        return None
    return (
        f"the {principal.role.value} role has no console (it needs: {console.name}); "
        "its key is for the API"
    )


def csrf_checked(request: Request, csrf: Annotated[str, Form()] = "") -> None:
    """A console form signed in by cookie must carry the session's CSRF token (a request
    with a bearer header, or on an open laptop, has no ambient credential to abuse)."""
    session: Session | None = request.scope.get("session")
    if session is not None and not hmac.compare_digest(csrf.encode(), session.csrf.encode()):
        raise HTTPException(403, "the form's CSRF token is missing or wrong: reload the page")


CsrfChecked = Annotated[None, Depends(csrf_checked)]


def _login_page(request: Request, templates: Jinja2Templates, **context: object) -> HTMLResponse:
    oidc = getattr(request.app.state, "oidc", None)
    status = int(str(context.pop("status", 401 if context.get("error") else 200)))
    return templates.TemplateResponse(
        request, "login.html", {"oidc": oidc is not None, **context}, status_code=status
    )


def install(templates: Jinja2Templates) -> APIRouter:
    @router.get("/login", response_class=HTMLResponse)
    def login_form(request: Request, next: Annotated[str, Query()] = "/ui") -> HTMLResponse:
        """Sign in with a key (or with OpenID Connect when configured)."""
        return _login_page(request, templates, next=safe_next(next))

    @router.post("/login")
    async def login(
        request: Request,
        key: Annotated[str, Form(max_length=500)] = "",
        next: Annotated[str, Form(max_length=2000)] = "/ui",
    ) -> Response:
        """A key (or the bootstrap token) -> a session cookie; a wrong one -> 401, a key
        whose role has no console (a client's) -> 403, a form another site posted -> 403,
        no cookie."""
        if from_elsewhere(request):
            foreign = "this sign-in was sent from another site: sign in from this page"
            return _login_page(request, templates, next=safe_next(next), error=foreign, status=403)
        auth = _authenticator(request)
        principal = await auth.bearer(key.strip().encode("utf-8"), "/ui")
        if principal is None:
            return _login_page(request, templates, next=safe_next(next), error="wrong key")
        refused = no_console_for(principal)
        if refused is not None:
            return _login_page(request, templates, next=safe_next(next), error=refused, status=403)
        return sign_in(request, principal, next)

    @router.post("/logout")
    async def logout(request: Request, _: CsrfChecked) -> Response:
        """End the session on the server (a copy of the cookie opens nothing any more),
        then clear the cookie."""
        session: Session | None = request.scope.get("session")
        if session is not None:
            await _authenticator(request).end(session)
        response = RedirectResponse("/ui/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    return router
