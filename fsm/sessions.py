"""Console sessions ended on the server (signing out): the ids of the sessions whose
cookie must open nothing any more, each kept until that cookie would have expired.

A session cookie is signed and carries a random id (`api.session`); signing out records
that id here, so a copy of the cookie (another tab, a stolen one) is refused too, by every
`serve` process (`api.auth` caches the answer like a key lookup). No HTTP, no caching.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, delete, insert, select
from sqlalchemy.exc import IntegrityError

from fsm.models import EndedSessionTable

ended = EndedSessionTable.__table__  # type: ignore[attr-defined]


def end_session(*, engine: Engine, sid: str, lasts: float) -> None:
    """Record that session `sid` has ended; its cookie would expire within `lasts`
    seconds, after which the row is dropped (the ones past their time go now)."""
    now = datetime.now(UTC)
    try:
        with engine.begin() as conn:
            conn.execute(delete(ended).where(ended.c.ends_at < now))
            conn.execute(insert(ended).values(sid=sid, ends_at=now + timedelta(seconds=lasts)))
    except IntegrityError:
        pass  # signed out twice (two tabs of one session): ended already


def session_ended(*, engine: Engine, sid: str) -> bool:
    with engine.connect() as conn:
        return conn.execute(select(ended.c.sid).where(ended.c.sid == sid)).first() is not None
