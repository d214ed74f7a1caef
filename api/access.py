"""Who may call what: the route x role table (issue 17), as data read by `api.auth` and by
the tests (which walk the app's routes and fail on any route missing here).

Each entry maps (method, path template) — the template exactly as the route declares it —
to the roles allowed; mounted apps are covered by path prefix. `OWN` routes let a client
through to orders it created only: the route itself answers 404 for anyone else's order
(no existence oracle), so this table alone never decides those. Nothing here reads a
request's credentials; that is `api.auth`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from fsm.roles import Role

CLIENT, READER, OPERATOR, ADMIN_ = Role.CLIENT, Role.READER, Role.OPERATOR, Role.ADMIN


@dataclass(frozen=True)
class Access:
    """The roles a route admits; `public` routes need no credentials at all."""

    name: str
    roles: frozenset[Role]
    public: bool = False

    def admits(self, role: Role) -> bool:
        return self.public or role in self.roles


PUBLIC = Access("public", frozenset(Role), public=True)
ANY_ROLE = Access("any role", frozenset(Role))
OWN = Access("client (own orders), reader, operator, admin", frozenset(Role))
PLACE = Access("client, operator, admin", frozenset({CLIENT, OPERATOR, ADMIN_}))
OWN_ACT = Access("client (own orders), operator, admin", frozenset({CLIENT, OPERATOR, ADMIN_}))
READ = Access("reader, operator, admin", frozenset({READER, OPERATOR, ADMIN_}))
OPERATE = Access("operator, admin", frozenset({OPERATOR, ADMIN_}))
ADMIN = Access("admin", frozenset({ADMIN_}))
# A path no route of the app serves: any caller who may call anything gets its 404 (a
# "needs: admin" would say it exists).
NO_SUCH_PATH = Access("any role (no such path)", frozenset(Role))

# (method, path template) -> who. HEAD is GET. Every route of the app is listed (a test
# walks app.routes); a route missing here needs an admin, a path the app does not serve
# answers 404 to any role.
ROUTES: Mapping[tuple[str, str], Access] = {
    ("GET", "/healthz"): PUBLIC,
    ("GET", "/readyz"): PUBLIC,
    ("GET", "/metrics"): PUBLIC,
    ("POST", "/orders"): PLACE,
    ("GET", "/orders"): OWN,  # a client's list holds its own orders only
    ("GET", "/orders/{order_id}"): OWN,
    ("GET", "/orders/{order_id}/transitions"): OWN,
    ("GET", "/orders/{order_id}/diagram"): OWN,
    ("POST", "/orders/{order_id}/cancel"): OWN_ACT,
    ("POST", "/orders/{order_id}/resume"): OPERATE,
    ("POST", "/orders/{order_id}/resolve"): OPERATE,
    ("GET", "/diagram"): ANY_ROLE,
    # the API's own documentation: anyone with a key may read how to call it
    ("GET", "/openapi.json"): ANY_ROLE,
    ("GET", "/docs"): ANY_ROLE,
    ("GET", "/docs/oauth2-redirect"): ANY_ROLE,
    ("GET", "/redoc"): ANY_ROLE,
    ("GET", "/redoc/redoc.standalone.js"): ANY_ROLE,  # served here, no CDN (issue 18)
    # the console: signing in is public, the pages are for readers, the actions operators'
    ("GET", "/ui/login"): PUBLIC,
    ("POST", "/ui/login"): PUBLIC,
    ("POST", "/ui/logout"): PUBLIC,  # a CSRF token is still required
    ("GET", "/ui/oidc/login"): PUBLIC,
    ("GET", "/ui/oidc/callback"): PUBLIC,
    ("GET", "/ui"): READ,
    ("GET", "/ui/heatmap"): READ,
    ("GET", "/ui/orders/{order_id}"): READ,
    ("GET", "/ui/orders/{order_id}/{action}"): OPERATE,
    ("POST", "/ui/orders/{order_id}/{action}"): OPERATE,
    # order events (issue 19): readers see destinations and dead letters, operators redeliver
    ("GET", "/ui/events"): READ,
    ("POST", "/ui/events/redeliver"): OPERATE,
}

# Mounted apps, by path prefix (longest first wins).
MOUNTS: Mapping[str, Access] = {
    # the console's stylesheet and script: the login page uses them before anyone signs
    # in, and they hold no data
    "/ui/static": PUBLIC,
    "/static-offline-docs": ANY_ROLE,  # /docs and /redoc's own scripts and styles
    "/services": ADMIN,  # the embedded reference services, /_faults and /_reset included
}

_PARAM = re.compile(r"{([^}:]+)(?::[^}]+)?}")


def _pattern(template: str) -> re.Pattern[str]:
    parts = _PARAM.split(template)
    # split() alternates literal text and parameter names
    regex = "".join(re.escape(p) if i % 2 == 0 else "[^/]+" for i, p in enumerate(parts))
    return re.compile(f"^{regex}$")


@dataclass(frozen=True)
class Table:
    """The table compiled for matching request paths."""

    routes: tuple[tuple[str, re.Pattern[str], Access], ...]
    mounts: tuple[tuple[str, Access], ...]
    paths: frozenset[str]
    served: tuple[re.Pattern[str], ...] = ()

    @classmethod
    def build(
        cls,
        routes: Mapping[tuple[str, str], Access] = ROUTES,
        mounts: Mapping[str, Access] = MOUNTS,
        served: Iterable[re.Pattern[str]] = (),
    ) -> Table:
        """`served`: the path patterns of the app's own routes and mounts (none given:
        every path the table does not know needs an admin)."""
        compiled = tuple((m, _pattern(t), a) for (m, t), a in routes.items())
        ordered = tuple(sorted(mounts.items(), key=lambda kv: -len(kv[0])))
        return cls(compiled, ordered, frozenset(t for _, t in routes), tuple(served))

    def access(self, method: str, path: str) -> Access:
        """Who may send `method` to `path`. A path the table does not know is refused to
        all but admins when a route of the app serves it (a route missing from the table:
        closed, not open), and is NO_SUCH_PATH when none does (any caller with a key then
        gets the 404, not a 403 saying it exists). `/ui/` is judged as `/ui`: the framework
        answers it with a redirect there, which is then the same for every role (and for
        nobody on /healthz/) instead of 403 for all but admins."""
        method = "GET" if method == "HEAD" else method
        route_path = path[:-1] if len(path) > 1 and path.endswith("/") else path
        path_known = False
        for m, pattern, access in self.routes:
            if pattern.match(route_path):
                if m == method:
                    return access
                path_known = True
        for prefix, access in self.mounts:
            if path == prefix or path.startswith(prefix + "/"):
                return access
        if path_known:  # e.g. DELETE /orders: 405 for anyone who may use the path at all
            return ANY_ROLE
        if self.served and not any(p.match(path) for p in self.served):
            return NO_SUCH_PATH
        return ADMIN


def public_paths(routes: Mapping[tuple[str, str], Access] = ROUTES) -> frozenset[str]:
    return frozenset(t for (_, t), a in routes.items() if a.public)


def roles_of(access: Access) -> Iterable[Role]:
    return sorted(access.roles, key=list(Role).index)


def matrix() -> Iterator[tuple[str, str, Access]]:
    """(method, template, access) of every row, for docs and tests."""
    for (method, template), access in ROUTES.items():
        yield method, template, access
