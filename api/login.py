"""Signing in to the console (issue 17): /ui/login with a key, /ui/logout, and the CSRF
check every console form goes through. OpenID Connect lives in `api.oidc`.

A successful sign-in sets the session cookie (`api.session`): signed, with an expiry, its
name and attributes per `api.cookies` (`__Host-` on https, so no sibling subdomain or
plain-http intruder can plant one). A sign-in form posted
from another site is refused (login CSRF: it would sign the victim's browser in as the
attacker's key): GET /ui/login sets a random pre-session cookie and puts the same value in
the form, and POST /ui/login signs in only when the two match. Another site can neither
read nor set this site's cookie, and nothing depends on the Host header (a proxy in front
may rewrite it). HTTP <-> the authenticator and the session signer only; who may see what
stays in `api.access`.
"""

from __future__ import annotations

import hmac
import re
import secrets
from typing import Annotated

from fastapi import APIRouter, Depends, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from api import cookies
from api.access import ROUTES
from api.auth import Authenticator
from api.session import Session
from fsm.keys import Principal
from fsm.settings import Settings

router = APIRouter(prefix="/ui", include_in_schema=False)
SOUND_TOKEN = re.compile(r"[A-Za-z0-9_-]{32,64}")
LOGIN_SECONDS = 3600  # a sign-in page left open longer is reloaded
FOREIGN = "this sign-in form expired or was sent from another site: reload the page and sign in"


def _authenticator(request: Request) -> Authenticator:
    found: Authenticator = request.app.state.authenticator
    return found


def safe_next(target: str | None) -> str:
    """Only a path on this site (never //evil.example or a scheme): an open redirect
    would turn the login page into a phishing hop."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/ui"


def set_cookie(request: Request, response: Response, base: str, value: str, max_age: int) -> None:
    """Set a console cookie (`api.cookies`: its name and attributes for this request)."""
    settings: Settings = request.app.state.settings
    cookies.put(response, request, settings.cookie_secure, base, value, max_age)


def drop_cookie(request: Request, response: Response, base: str) -> None:
    settings: Settings = request.app.state.settings
    cookies.drop(response, request, settings.cookie_secure, base)


def read_cookie(request: Request, base: str) -> str:
    """A console cookie's value under this request's name; "" when absent or sent twice."""
    settings: Settings = request.app.state.settings
    found = cookies.read_once(request.headers, cookies.name(base, settings.cookie_secure, request))
    return found or ""


def sign_in(request: Request, principal: Principal, target: str) -> Response:
    """Set the session cookie for `principal` and go to `target`."""
    auth = _authenticator(request)
    assert auth.sessions is not None
    bound = auth.token_fingerprint() if principal.kind == "token" else None
    cookie, _ = auth.sessions.issue(principal, bound=bound)
    settings: Settings = request.app.state.settings
    response = RedirectResponse(safe_next(target), status_code=303)
    set_cookie(request, response, cookies.SESSION, cookie, settings.session_seconds)
    drop_cookie(request, response, cookies.LOGIN)  # spent: the next sign-in gets a new one
    return response


def _login_token(request: Request) -> str:
    """The sign-in form's token: the browser's pre-session cookie when it has a sound one
    (two open sign-in tabs both work), else a new random one."""
    have = read_cookie(request, cookies.LOGIN)
    if SOUND_TOKEN.fullmatch(have):
        return have
    return secrets.token_urlsafe(32)


def from_this_form(request: Request, sent: str) -> bool:
    """Was this sign-in posted by the form this site served to this browser? Its hidden
    field must equal the pre-session cookie set with the form; a page elsewhere can post
    the form but can neither read nor set that cookie. A script GETs the form first."""
    have = read_cookie(request, cookies.LOGIN)
    return bool(have) and secrets.compare_digest(sent.encode(), have.encode())


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
    token = _login_token(request)
    page = templates.TemplateResponse(
        request,
        "login.html",
        {"oidc": oidc is not None, "login_token": token, **context},
        status_code=status,
    )
    set_cookie(request, page, cookies.LOGIN, token, LOGIN_SECONDS)
    return page


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
        login_token: Annotated[str, Form(max_length=200)] = "",
    ) -> Response:
        """A key (or the bootstrap token) -> a session cookie; a wrong one -> 401, a key
        whose role has no console (a client's) -> 403, a form this site did not serve to
        this browser (another site's, or one without its pre-session cookie) -> 403, no
        session cookie."""
        if not from_this_form(request, login_token):
            return _login_page(request, templates, next=safe_next(next), error=FOREIGN, status=403)
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
        drop_cookie(request, response, cookies.SESSION)
        return response

    return router
