"""The console's session cookie (issue 17): who signed in, signed and timestamped.

The cookie holds the principal (name, role, how it signed in, e-mail for OIDC), a random
session id (signing out records it as ended: `fsm.sessions`), a CSRF token and nothing
secret; it is signed with a key derived from the deployment's random
`session` secret (`fsm.keys.server_secret`), so every `serve` process accepts every
other's cookies, and it expires after `max_age` seconds (the signature carries the time).
Its name (`__Host-` on https) and attributes are `api.cookies`'s. A key-backed session
is re-checked against the key on every request (`api.auth`), so revoking the key ends
its sessions too. No I/O here.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from itsdangerous import BadSignature, URLSafeTimedSerializer

from api.cookies import SESSION as COOKIE
from fsm.keys import Principal
from fsm.roles import Role

__all__ = ["COOKIE", "DEFAULT_MAX_AGE", "Session", "Sessions"]
DEFAULT_MAX_AGE = 8 * 3600


@dataclass(frozen=True, slots=True)
class Session:
    name: str
    role: Role
    kind: str  # "key", "token" or "oidc"
    csrf: str
    sid: str  # random: what signing out ends on the server
    email: str | None = None
    # A bootstrap-token session: a keyed fingerprint of the token it signed in with, so
    # changing ORDER_SAGA_API_TOKEN ends it (it reveals nothing of the token).
    bound: str | None = None

    @property
    def principal(self) -> Principal:
        return Principal(name=self.name, role=self.role, kind=self.kind, email=self.email)


class Sessions:
    def __init__(self, secret: bytes, *, max_age: int = DEFAULT_MAX_AGE) -> None:
        self.max_age = max_age
        self.signer = URLSafeTimedSerializer(secret, salt="order-saga console session")

    def issue(self, principal: Principal, *, bound: str | None = None) -> tuple[str, Session]:
        session = Session(
            name=principal.name,
            role=principal.role,
            kind=principal.kind,
            csrf=secrets.token_urlsafe(24),
            sid=secrets.token_urlsafe(24),
            email=principal.email,
            bound=bound,
        )
        data = {
            "n": session.name,
            "r": session.role.value,
            "k": session.kind,
            "c": session.csrf,
            "s": session.sid,
            "e": session.email,
            "b": session.bound,
        }
        return self.signer.dumps(data), session

    def read(self, cookie: str) -> Session | None:
        """The session in a cookie; None if forged, altered, expired or malformed (one
        made before sessions had an id, too: it could not be ended)."""
        try:
            data = self.signer.loads(cookie, max_age=self.max_age)
            return Session(
                name=str(data["n"]),
                role=Role(data["r"]),
                kind=str(data["k"]),
                csrf=str(data["c"]),
                sid=str(data["s"]),
                email=data.get("e"),
                bound=data.get("b"),
            )
        except (BadSignature, KeyError, TypeError, ValueError):
            return None
