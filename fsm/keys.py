"""Client keys with roles (issue 17): create, look up, list, revoke; who a caller is.

A key's secret (`osk_` + 43 url-safe characters, 256 random bits) is shown once by
`create_key` and never stored: the `api_keys` row holds HMAC-SHA256(pepper, secret), the
pepper being a random secret of this deployment kept in `server_secrets` (made on first
use, shared by every process through the database, so no setting has to be copied between
hosts). Secrets are high-entropy, so the hash is not there to slow guessing; the pepper
makes a leaked `api_keys` table useless on another deployment and the stored value
unusable as a key. No HTTP here and no caching: `api.auth` caches lookups.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Engine, func, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from fsm.models import ApiKeyTable, ServerSecretTable
from fsm.roles import Role

PREFIX = "osk_"  # greppable: secret scanners and `git grep osk_` find a leaked key
NAME = re.compile(r"^[a-z0-9][a-z0-9._@-]{0,63}$")
keys = ApiKeyTable.__table__  # type: ignore[attr-defined]
server_secrets = ServerSecretTable.__table__  # type: ignore[attr-defined]


class KeyError_(ValueError):
    """A bad name, a name taken, an unknown key: the message is for the operator."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a key's name and role, the bootstrap token, an OIDC user, or
    nobody (`anonymous`, only while authentication is off)."""

    name: str
    role: Role
    kind: str = "key"  # key | token | oidc | anonymous | internal
    email: str | None = None

    @property
    def creator(self) -> str:
        """What `orders.created_by` records and idempotency keys are scoped by: a key's
        name; `oidc:` + the subject for an OIDC user (its own namespace: a subject equal
        to a client key's name must not share that key's orders; ':' is in no key name);
        "" for the bootstrap token and the open laptop (one shared identity, as before
        keys existed, so their retries still find their orders)."""
        if self.kind == "key":
            return self.name
        if self.kind == "oidc":
            return oidc_owner(self.name)
        return ""

    @property
    def sees_only_own(self) -> bool:
        return self.role is Role.CLIENT

    @property
    def audit(self) -> dict[str, str]:
        """How the transition log names this caller."""
        who = {"by": self.name, "as": self.role.value, "via": self.kind}
        if self.email:
            who["email"] = self.email
        return who


OIDC_OWNER = "oidc:"
OWNER_MAX = 64  # orders.created_by


def oidc_owner(subject: str) -> str:
    """`oidc:<sub>`; a subject too long for the column (OIDC allows 255 characters) as
    `oidc:` + 59 hex digits of its SHA-256, one character longer than any literal form
    can be, so the two forms never meet."""
    literal = OIDC_OWNER + subject
    if len(literal) < OWNER_MAX:
        return literal
    digest = hashlib.sha256(subject.encode("utf-8", "surrogatepass")).hexdigest()
    return OIDC_OWNER + digest[: OWNER_MAX - len(OIDC_OWNER)]


@dataclass(frozen=True, slots=True)
class KeyInfo:
    name: str
    role: Role
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


def _now() -> datetime:
    return datetime.now(UTC)


def server_secret(*, engine: Engine, name: str) -> bytes:
    """The deployment's random secret `name`, made by whichever process asks first."""
    with engine.begin() as conn:
        row = conn.execute(
            select(server_secrets.c.value).where(server_secrets.c.name == name)
        ).first()
    if row is not None:
        return bytes.fromhex(row[0])
    try:
        with engine.begin() as conn:
            conn.execute(insert(server_secrets).values(name=name, value=secrets.token_hex(32)))
    except IntegrityError:
        pass  # another process made it first: read theirs
    with engine.begin() as conn:
        value = conn.execute(
            select(server_secrets.c.value).where(server_secrets.c.name == name)
        ).scalar_one()
    return bytes.fromhex(value)


INTERNAL_PREFIX = "osi_"


def internal_token(*, engine: Engine) -> str | None:
    """The bearer this deployment's processes send to its own embedded services: any
    process that can read the database can derive it, nobody else can. None before the
    schema exists (nothing to protect yet)."""
    try:
        return INTERNAL_PREFIX + server_secret(engine=engine, name="internal_token").hex()
    except SQLAlchemyError:
        return None


def key_hash(pepper: bytes, secret: str) -> str:
    return hmac.new(pepper, secret.encode("utf-8"), hashlib.sha256).hexdigest()


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise KeyError_(
            f"bad key name {name[:70]!r}: 1-64 of a-z 0-9 . _ @ -, starting with a letter or digit"
        )
    return name


def create_key(*, engine: Engine, name: str, role: Role) -> str:
    """Store a new key and return its secret (the only time it exists in clear)."""
    check_name(name)
    secret = PREFIX + secrets.token_urlsafe(32)
    digest = key_hash(server_secret(engine=engine, name="key_pepper"), secret)
    try:
        with engine.begin() as conn:
            conn.execute(
                insert(keys).values(name=name, role=role.value, key_hash=digest, created_at=_now())
            )
    except IntegrityError:
        raise KeyError_(f"a key named {name!r} exists already (names are never reused)") from None
    return secret


def find_key(*, engine: Engine, digest: str) -> Principal | None:
    """The live key with this hash; None if unknown or revoked. A read only: checking a
    key must not wait for (or fail on) SQLite's write lock; `note_use` records its use."""
    with engine.connect() as conn:
        row = conn.execute(
            select(keys.c.name, keys.c.role).where(
                keys.c.key_hash == digest, keys.c.revoked_at.is_(None)
            )
        ).first()
    if row is None:
        return None
    return Principal(name=row.name, role=Role(row.role))


def note_use(*, engine: Engine, name: str) -> None:
    """Set key `name`'s `last_used_at` to now (`keys list`'s "used")."""
    with engine.begin() as conn:
        conn.execute(update(keys).where(keys.c.name == name).values(last_used_at=_now()))


def live_role(*, engine: Engine, name: str) -> Role | None:
    """The role of the live key `name` (a console session signed in with it); None once
    it is revoked."""
    with engine.connect() as conn:
        role = conn.execute(
            select(keys.c.role).where(keys.c.name == name, keys.c.revoked_at.is_(None))
        ).scalar()
    return Role(role) if role is not None else None


def any_keys(*, engine: Engine) -> bool:
    """Has a key ever been made here (revoked ones count: revoking the last key must not
    open the API again)."""
    with engine.connect() as conn:
        return bool(conn.execute(select(func.count()).select_from(keys)).scalar_one())


def list_keys(*, engine: Engine) -> list[KeyInfo]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(
                keys.c.name, keys.c.role, keys.c.created_at, keys.c.last_used_at, keys.c.revoked_at
            ).order_by(keys.c.name)
        ).all()
    return [
        KeyInfo(
            name=r.name,
            role=Role(r.role),
            created_at=_utc(r.created_at),
            last_used_at=_utc(r.last_used_at) if r.last_used_at else None,
            revoked_at=_utc(r.revoked_at) if r.revoked_at else None,
        )
        for r in rows
    ]


def revoke_key(*, engine: Engine, name: str) -> None:
    check_name(name)  # no key has any other name; one not UTF-8 would not even encode
    with engine.begin() as conn:
        found = conn.execute(
            update(keys)
            .where(keys.c.name == name, keys.c.revoked_at.is_(None))
            .values(revoked_at=_now())
        ).rowcount
        if found == 0:
            known = conn.execute(select(keys.c.name).where(keys.c.name == name)).first()
            raise KeyError_(
                f"key {name!r} is revoked already" if known else f"no key named {name!r}"
            )


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)
