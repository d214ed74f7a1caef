"""The console's cookies (issue 17): their names, their attributes and how they are read,
in one place. No I/O, no decisions about who is signed in.

Every cookie is HttpOnly, SameSite=Lax, Path=/, and Secure unless ORDER_SAGA_COOKIE_SECURE
=false or (when unset) the console is reached as plain http on 127.0.0.1/localhost by a
browser on plain http. On a console reached over https, or by any other host name (taken
to be behind TLS, as the Secure rule does), or with COOKIE_SECURE=true, the names carry the
`__Host-` prefix: a browser keeps such a cookie only when this very host
set it over https, Secure, Path=/ and without Domain, so neither a sibling subdomain
(`Domain=example.com`) nor a man in the middle on plain http can plant one, and only the
prefixed names are read there. The name is decided from the settings and the request's
URL alone (not the browser's Origin, which a GET of the sign-in page lacks), so the GET
that sets a cookie and the POST that reads it agree; plain http on 127.0.0.1/localhost
keeps the bare names (a `__Host-` cookie cannot be set over http). A name sent more than
once (a planted cookie next to the browser's own, on another path or domain) is read as
absent: which of the two is this site's cannot be told.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.requests import HTTPConnection
from starlette.responses import Response

SESSION = "order_saga_session"  # who signed in: `api.session`
LOGIN = "order_saga_login"  # the sign-in form's token, before any session: `api.login`
FLOW = "order_saga_oidc"  # an OpenID Connect sign-in under way: `api.oidc`
HOST_PREFIX = "__Host-"
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def _on_https(configured: bool | None, connection: HTTPConnection) -> bool:
    if configured is not None:
        return configured
    return connection.url.scheme == "https" or connection.url.hostname not in LOCAL_HOSTS


def secure(configured: bool | None, connection: HTTPConnection) -> bool:
    """COOKIE_SECURE (`configured`), or when unset: Secure unless the console is reached as
    plain http on this machine. The browser's own Origin (or Referer) counts too: behind a
    proxy that ends TLS and rewrites Host, the request looks like http://127.0.0.1 while the
    browser is on https, and its cookie must stay off plain http."""
    if configured is not None:
        return configured
    sent_from = connection.headers.get("origin") or connection.headers.get("referer") or ""
    return _on_https(None, connection) or sent_from.lower().startswith("https:")


def name(base: str, configured: bool | None, connection: HTTPConnection) -> str:
    """The cookie `base` is set and read under for this request: `__Host-base` unless the
    console is plain http on this machine (or COOKIE_SECURE=false)."""
    return HOST_PREFIX + base if _on_https(configured, connection) else base


def read_once(headers: Headers, cookie: str) -> str | None:
    """The value of `cookie` in the request's Cookie header(s); None when it is absent or
    sent more than once (Starlette would keep the last, whichever site set it)."""
    found: list[str] = []
    for header in headers.getlist("cookie"):
        for chunk in header.split(";"):
            key, equals, value = chunk.partition("=")
            if equals and key.strip() == cookie:
                found.append(value.strip())
    return found[0] if len(found) == 1 else None


def put(
    response: Response,
    connection: HTTPConnection,
    configured: bool | None,
    base: str,
    value: str,
    max_age: int,
) -> None:
    """Set cookie `base` under this request's name, with the attributes above."""
    response.set_cookie(
        name(base, configured, connection),
        value,
        max_age=max_age,
        httponly=True,
        samesite="lax",
        secure=secure(configured, connection),
        path="/",
    )


def drop(
    response: Response, connection: HTTPConnection, configured: bool | None, base: str
) -> None:
    """Clear cookie `base` (a browser ignores clearing a `__Host-` cookie without Secure)."""
    response.delete_cookie(
        name(base, configured, connection),
        path="/",
        httponly=True,
        samesite="lax",
        secure=secure(configured, connection),
    )
