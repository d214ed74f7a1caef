"""This process's clock against the database's, compared once at start on PostgreSQL.

Leases, deadlines and sweep ages are computed from each process's own clock and compared
with times other processes wrote: a worker whose clock runs 60 s ahead sees every lease
as expired and takes orders their drivers still hold. This module does not move those
comparisons to the database's clock; it refuses to start a process whose clock is
provably off by more than a quarter of the lease (`ClockSkew`: sync the clock), and
warns above `WARN_SKEW`. SQLite is one host, one clock: nothing to compare. `check` is
the decision, a pure function; `check_database_clock` takes the reading.

    check_database_clock(engine, lease_seconds=settings.lease_seconds)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from sqlalchemy import Engine, func, select
from sqlalchemy.exc import SQLAlchemyError

from fsm.queries import utcnow
from fsm.sql import as_utc

__all__ = ["WARN_SKEW", "ClockSkew", "check", "check_database_clock"]

log = logging.getLogger("order_saga.clock")

# Above this (or half the refusal bound, if smaller) a start is logged as a warning.
WARN_SKEW = 1.0


class ClockSkew(RuntimeError):
    """This host's clock is too far from the database's for leases to mean anything."""


def check(*, db_now: datetime, sent: datetime, received: datetime, lease_seconds: float) -> str:
    """The database read its clock (`db_now`) somewhere between `sent` and `received`
    (this process's clock): the skew is measured from the round trip's middle, give or
    take half of it, and only the part beyond that uncertainty counts. Raises ClockSkew
    above a quarter of the lease; returns a warning above WARN_SKEW (or half that
    bound), else ""."""
    half = (received - sent).total_seconds() / 2
    skew = (sent - db_now).total_seconds() + half  # > 0: this clock is ahead
    provable = abs(skew) - half
    refuse = lease_seconds / 4
    where = "ahead of" if skew > 0 else "behind"
    line = f"this host's clock is {abs(skew):.1f} s {where} the database's (±{half:.2f} s)"
    if provable > refuse:
        raise ClockSkew(
            f"{line}; leases of {lease_seconds:g} s tolerate at most {refuse:g} s, and "
            "a clock ahead takes leases other processes still hold: sync the clock "
            "(NTP: chronyd, systemd-timesyncd) and start again"
        )
    if provable > min(WARN_SKEW, refuse / 2):
        return f"{line}: leases, deadlines and sweep ages are off by as much; sync the clock (NTP)"
    return ""


def check_database_clock(
    engine: Engine, *, lease_seconds: float, clock: Callable[[], datetime] = utcnow
) -> None:
    """Compare `clock` with the database's (PostgreSQL; SQLite: nothing to do). Raises
    ClockSkew; logs a warning for a smaller skew. A database that does not answer is
    not this check's to report: the process goes on as it would without it (`serve`
    answers 503, a command fails in its own one line)."""
    if engine.dialect.name == "sqlite":
        return
    try:
        with engine.connect() as conn:
            sent = clock()
            db_now = as_utc(conn.execute(select(func.clock_timestamp())).scalar_one())
            received = clock()
    except SQLAlchemyError as exc:
        log.debug("could not compare this host's clock with the database's (%s)", exc)
        return
    assert db_now is not None
    warning = check(db_now=db_now, sent=sent, received=received, lease_seconds=lease_seconds)
    if warning:
        log.warning("%s", warning)
