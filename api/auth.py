"""Authentication and role checks at the edge (issue 17): pure ASGI, in front of every
route and every mount, so a route added later is covered without anyone remembering to.

Who is calling comes from, in this order: `Authorization: Bearer` (the bootstrap
ORDER_SAGA_API_TOKEN, a client key, or the process's own internal token on the embedded
services only), else the console's signed session cookie (`api.session`; read under its
`__Host-` name on https, and not at all when sent twice: `api.cookies`). The caller is
put on the scope as `scope["principal"]`; whether its role may call the route is looked up
in `api.access.ROUTES` (data). Authentication is enforced once ORDER_SAGA_API_TOKEN is set,
OpenID Connect is configured (ORDER_SAGA_OIDC_ISSUER: a sign-in that guarded nothing would
be a lie; fail closed), or any key has ever been created; until then (a laptop) every path
is open, the caller being `anonymous` with every right. Key lookups, and whether a
console session was signed out, are cached for `ttl` seconds per process, so a revoked key
or a signed-out session stops working within that time everywhere; checking a key only reads (its
`last_used_at` is written aside, at most once a minute per key, and a failed write fails
no request), and while the database cannot be read a caller with credentials gets a 503,
as a route would, never a 500. This module never writes a secret anywhere: answers name
the problem, never the credential.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote

import anyio.to_thread
from fastapi.security import HTTPBearer
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from starlette.datastructures import Headers
from starlette.requests import HTTPConnection
from starlette.responses import RedirectResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from api import cookies
from api.access import Access, Table
from api.cache import Cache
from api.problems import is_unavailable, problem, unavailable
from api.session import DEFAULT_MAX_AGE, Session, Sessions
from fsm import keys, sessions
from fsm.keys import Principal
from fsm.roles import Role

BEARER = HTTPBearer(
    auto_error=False,
    description="An API key (`order-saga keys create`) or ORDER_SAGA_API_TOKEN; "
    "required on every path but /healthz and /metrics once either exists (or single "
    "sign-on is configured)",
)
ANONYMOUS = Principal(name="anonymous", role=Role.ADMIN, kind="anonymous")
TOKEN_PRINCIPAL = Principal(name="api-token", role=Role.ADMIN, kind="token")
INTERNAL = Principal(name="order-saga", role=Role.ADMIN, kind="internal")
# On a public path while authentication is enforced: nobody in particular, least rights.
NOBODY = Principal(name="nobody", role=Role.CLIENT, kind="none")
USE_NOTED_EVERY = 60.0  # seconds: how often a key's `last_used_at` is written, at most
log = logging.getLogger("order_saga.api")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
PAGES = ("/ui", "/docs", "/redoc")  # for people: a browser is sent to the login page


class Authenticator:
    """Credentials -> Principal, with the lookups cached for `ttl` seconds."""

    def __init__(
        self,
        engine: Engine | None,
        *,
        api_token: str | None,
        oidc: bool = False,
        ttl: float = 2.0,
        session_seconds: int = DEFAULT_MAX_AGE,
    ) -> None:
        self._engine = engine
        self.session_seconds = session_seconds
        self.token = api_token.encode("utf-8") if api_token else None
        self.oidc = oidc  # single sign-on configured: enforced with no key and no token
        self.ttl = ttl
        self._keys = Cache(ttl)
        self._names = Cache(ttl)
        self._ended = Cache(ttl)
        self._enforced = Cache(ttl, size=1)
        self._used: dict[str, float] = {}  # key name -> when its use was last written
        self._noting: set[asyncio.Task[None]] = set()
        self._pepper: bytes | None = None
        self._internal: bytes | None = None
        self.sessions: Sessions | None = None

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("the app's lifespan has not run: no database to check keys in")
        return self._engine

    @engine.setter
    def engine(self, engine: Engine) -> None:
        self._engine = engine

    def _secrets(self) -> None:
        if self._pepper is None:
            # All read before any is kept: a read failing halfway leaves none set, so the
            # next `setup` reads them all again (not a pepper with no session signer).
            pepper = keys.server_secret(engine=self.engine, name="key_pepper")
            internal = (keys.internal_token(engine=self.engine) or "").encode()
            session = keys.server_secret(engine=self.engine, name="session")
            # the cookie's Max-Age, enforced here too
            self.sessions = Sessions(session, max_age=self.session_seconds)
            self._internal = internal
            self._pepper = pepper

    async def setup(self) -> None:
        if self._pepper is None:  # once per process: no thread hop on each request
            await anyio.to_thread.run_sync(self._secrets)

    async def ready(self) -> bool:
        """`setup`, if it has not succeeded yet (the database was down when the process
        started): True once the secrets are read, False while they still cannot be (tried
        again on the next call)."""
        try:
            await self.setup()
        except SQLAlchemyError as exc:
            log.warning("could not read the deployment's secrets (%s)", type(exc).__name__)
            return False
        return True

    async def settle(self) -> None:
        """Wait for every lookup in flight (at shutdown: the engine is disposed next, and a
        lookup's connection must not come back to it afterwards)."""
        for cache in (self._keys, self._names, self._enforced, self._ended):
            await cache.settle()
        loop = asyncio.get_running_loop()
        writes = [t for t in self._noting if t.get_loop() is loop and not t.done()]
        await asyncio.gather(*writes, return_exceptions=True)

    async def enforced(self) -> bool:
        if self.token is not None or self.oidc:
            return True
        return bool(await self._enforced.fetch(None, lambda: keys.any_keys(engine=self.engine)))

    async def bearer(self, given: bytes, path: str) -> Principal | None:
        """The principal of a bearer credential (as sent, latin-1 bytes), None if wrong."""
        if self.token is not None and hmac.compare_digest(given, self.token):
            return TOKEN_PRINCIPAL
        await self.setup()
        if self._internal and hmac.compare_digest(given, self._internal):
            return INTERNAL if path.startswith("/services/") or path == "/services" else None
        try:
            secret = given.decode("ascii")
        except UnicodeDecodeError:
            return None
        if not secret.startswith(keys.PREFIX):
            return None
        assert self._pepper is not None
        digest = keys.key_hash(self._pepper, secret)
        principal: Principal | None = await self._keys.fetch(
            digest, lambda: keys.find_key(engine=self.engine, digest=digest)
        )
        if principal is not None:
            self._note_use(principal.name)
        return principal

    def _note_use(self, name: str) -> None:
        """Write that key `name` was used, aside (the request does not wait for it) and at
        most once per USE_NOTED_EVERY per process: on SQLite a write waits for the lock
        any writer holds, and a key check must not."""
        now = time.monotonic()
        last = self._used.get(name)
        if last is not None and now - last < USE_NOTED_EVERY:
            return
        if len(self._used) >= 10_000:
            self._used.clear()
        self._used[name] = now
        task = asyncio.get_running_loop().create_task(self._write_use(name))
        self._noting.add(task)
        task.add_done_callback(self._noting.discard)

    async def _write_use(self, name: str) -> None:
        try:
            await anyio.to_thread.run_sync(lambda: keys.note_use(engine=self.engine, name=name))
        except Exception as exc:  # best effort: "last used" is a hint, not a record
            log.debug("last_used_at of key %r not written: %s", name, type(exc).__name__)

    def token_fingerprint(self) -> str | None:
        """What a bootstrap-token session is bound to: HMAC of the configured token under
        the pepper (call after `setup`); None without a token."""
        if self.token is None or self._pepper is None:
            return None
        return hmac.new(self._pepper, b"api-token:" + self.token, hashlib.sha256).hexdigest()

    async def session(self, session: Session) -> Principal | None:
        """A console session's principal; None once it was signed out (in any process:
        within `ttl`) or its key revoked."""
        ended = await self._ended.fetch(
            session.sid, lambda: sessions.session_ended(engine=self.engine, sid=session.sid)
        )
        if ended:
            return None
        if session.kind == "token":  # valid while that token is still the configured one
            now = self.token_fingerprint()
            if now is None or session.bound is None:
                return None
            return session.principal if hmac.compare_digest(session.bound, now) else None
        if session.kind != "key":
            return session.principal
        role = await self._names.fetch(
            session.name, lambda: keys.live_role(engine=self.engine, name=session.name)
        )
        if role is None:
            return None
        return Principal(name=session.name, role=role, kind="key")

    async def end(self, session: Session) -> None:
        """Sign `session` out on the server: every process refuses its cookie within
        `ttl`, this one at once."""
        await anyio.to_thread.run_sync(
            lambda: sessions.end_session(
                engine=self.engine, sid=session.sid, lasts=self.session_seconds
            )
        )
        self._ended.put(session.sid, True)


def _unauthorized(detail: str = "missing or wrong bearer token") -> Any:
    return problem(401, detail, code="unauthorized", headers={"WWW-Authenticate": "Bearer"})


def _forbidden(principal: Principal, access: Access) -> Any:
    return problem(
        403,
        f"the {principal.role.value} role may not do this (needs: {access.name})",
        code="forbidden",
    )


def _wants_page(scope: Scope, headers: Headers) -> bool:
    path: str = scope["path"]
    return (
        scope["method"] in ("GET", "HEAD")
        and path.startswith(PAGES)
        and "text/html" in headers.get("accept", "")
    )


def _next(scope: Scope) -> str:
    """Where the login page sends the browser back to: the page asked for, its query
    string included (a filtered list, a deep link), as one URL-encoded parameter."""
    path: str = scope["path"]
    target = path.encode("utf-8")
    query: bytes = scope.get("query_string", b"")
    if query:
        target += b"?" + query  # the bytes as sent, re-encoded whole
    return quote(target, safe="/")


class AuthGate:
    def __init__(
        self,
        app: ASGIApp,
        *,
        authenticator: Authenticator,
        table: Table | None = None,
        routes: Sequence[BaseRoute] = (),
        cookie_secure: bool | None = None,
    ) -> None:
        self.app = app
        self.auth = authenticator
        # the app's routes and mounts: a path none of them serves is a 404 to any role
        served = [r.path_regex for r in routes if isinstance(r, Route | Mount)]
        self.table = table or Table.build(served=served)
        self.cookie_secure = cookie_secure  # ORDER_SAGA_COOKIE_SECURE: the cookie's name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        access = self.table.access(scope["method"], scope["path"])
        scope["principal"] = ANONYMOUS
        try:
            enforced = await self.auth.enforced()
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            await self._unavailable(access, scope, receive, send)
            return
        if not enforced:
            await self.app(scope, receive, send)
            return
        scope["principal"] = NOBODY
        connection = HTTPConnection(scope)
        credentials = await BEARER(connection)
        cookie = cookies.read_once(
            connection.headers, cookies.name(cookies.SESSION, self.cookie_secure, connection)
        )
        principal: Principal | None = None
        try:
            if credentials is not None:
                # Starlette decodes header bytes as latin-1: encoding back gives the bytes
                # sent, so a non-ASCII header is compared, never a TypeError.
                given = credentials.credentials.encode("latin-1")
                principal = await self.auth.bearer(given, scope["path"])
                if principal is None and not access.public:
                    await _unauthorized()(scope, receive, send)
                    return
            elif "authorization" not in connection.headers and cookie is not None:
                principal = await self._from_cookie(scope, connection, cookie)
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            await self._unavailable(access, scope, receive, send)
            return
        if principal is None:
            if access.public:
                await self.app(scope, receive, send)
                return
            if _wants_page(scope, connection.headers):
                login = RedirectResponse(f"/ui/login?next={_next(scope)}", status_code=303)
                await login(scope, receive, send)
                return
            await _unauthorized()(scope, receive, send)
            return
        scope["principal"] = principal
        if not access.admits(principal.role):
            await _forbidden(principal, access)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _unavailable(
        self, access: Access, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """Keys and sessions live in the database: while it cannot be read a public route
        still answers (health says why), any other gets the 503 a route gives (with
        Retry-After), never a 500."""
        answer = self.app if access.public else unavailable("database")
        await answer(scope, receive, send)

    async def _from_cookie(
        self, scope: Scope, connection: HTTPConnection, cookie: str
    ) -> Principal | None:
        await self.auth.setup()
        assert self.auth.sessions is not None
        session = self.auth.sessions.read(cookie)
        if session is None:
            return None
        scope["session"] = session
        path: str = scope["path"]
        if scope["method"] not in SAFE_METHODS and not path.startswith("/ui/"):
            # The API with a console cookie (e.g. /docs "try it out"): only with the
            # session's CSRF token in a header, since a cookie rides along by itself.
            sent = connection.headers.get("x-csrf-token", "")
            if not hmac.compare_digest(sent.encode("latin-1"), session.csrf.encode()):
                return None
        return await self.auth.session(session)


def principal_of(scope: Scope) -> Principal:
    found: Principal = scope.get("principal", ANONYMOUS)
    return found


PrincipalGetter = Callable[[Scope], Principal]
