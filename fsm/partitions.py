"""Daily partitions of `transitions` on PostgreSQL (issue 22): what exists, what to create
ahead of time, and the whole-partition drop retention uses instead of row deletes.

The scheme: `transitions` is partitioned by RANGE on `order_created_at`, the creation time
of the row's order copied into each of its transitions. An order never changes its
creation time, so all its transitions live in one partition, and the primary key
(order_id, seq, order_created_at) is unique exactly when (order_id, seq) is. One partition
per UTC day, `transitions_pYYYYMMDD`, created `AHEAD` days ahead by every `serve`/`worker`
(`maintain_forever`, hourly) and by the migration; `transitions_default` catches a row no
day partition covers (a process down longer than `AHEAD` days, a clock far off) so an
insert never fails for want of a partition. SQLite has one plain table.

Reads that know the order pass `order_created_at` too, so PostgreSQL scans one partition
(`fsm.queries.history`, retention); the heatmap reads every partition, as it read the
whole table before.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time as time_module
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError, OperationalError

from fsm.errors import outage, outage_line

log = logging.getLogger("order_saga.partitions")

PARENT = "transitions"
DEFAULT = "transitions_default"
AHEAD = 7  # days of partitions kept ready beyond today
_NAME = re.compile(r"^transitions_p(\d{8})$")
# Creating or detaching a partition takes a short exclusive lock on `transitions`: the
# engine's inserts queue behind it. Never wait long for it (a long reader holds it off);
# try again later instead.
LOCK_TIMEOUT_MS = 200


def is_partition(name: str | None) -> bool:
    """A partition of `transitions` (Alembic compares the parent only)."""
    return name is not None and (name == DEFAULT or _NAME.match(name) is not None)


# An index only PostgreSQL has (the outbox's stream order; fsm.models): left out of the
# comparison on both (tests/test_migrations.py checks it where it belongs).
OUTBOX_STREAM_INDEX = "ix_outbox_events_txid_position"


def include_name(name: str | None, type_: str, parent_names: object) -> bool:
    """Alembic's `include_name` hook: leave the partitions out of autogenerate."""
    return not (type_ == "table" and is_partition(name))


def include_object(
    obj: object, name: str | None, type_: str, reflected: bool, compare_to: object
) -> bool:
    """Alembic's `include_object` hook: leave the one dialect-only index out."""
    return not (type_ == "index" and name == OUTBOX_STREAM_INDEX)


def name_of(day: date) -> str:
    return f"transitions_p{day:%Y%m%d}"


def bounds(day: date) -> tuple[datetime, datetime]:
    start = datetime.combine(day, time(), tzinfo=UTC)
    return start, start + timedelta(days=1)


@dataclass(frozen=True)
class Partition:
    name: str
    start: datetime
    end: datetime


def is_partitioned(conn: Connection) -> bool:
    if conn.dialect.name != "postgresql":
        return False
    kind = conn.execute(
        text("SELECT relkind FROM pg_class WHERE oid = to_regclass(:t)"), {"t": PARENT}
    ).scalar()
    return kind == "p"


def existing(conn: Connection) -> list[Partition]:
    """The attached day partitions, oldest first (the default one is not listed)."""
    rows = conn.execute(
        text(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = to_regclass(:t)"
        ),
        {"t": PARENT},
    ).scalars()
    found = []
    for name in rows:
        match = _NAME.match(name)
        if match:
            day = datetime.strptime(match.group(1), "%Y%m%d").date()
            found.append(Partition(name, *bounds(day)))
    return sorted(found, key=lambda p: p.start)


def create_ddl(day: date) -> str:
    start, end = bounds(day)
    return (
        f"CREATE TABLE IF NOT EXISTS {name_of(day)} PARTITION OF {PARENT} "
        f"FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"
    )


def create_statements(
    *, have: set[str], default: bool, first: date | None = None, last: date | None = None
) -> list[str]:
    """DDL for the default partition (unless `default`: it exists) and the day partitions
    from `first` (default yesterday) to `last` (default today + AHEAD) not in `have`."""
    today = datetime.now(UTC).date()
    day = first or today - timedelta(days=1)
    last = last or today + timedelta(days=AHEAD)
    statements = [] if default else [f"CREATE TABLE {DEFAULT} PARTITION OF {PARENT} DEFAULT"]
    while day <= last:
        if name_of(day) not in have:
            statements.append(create_ddl(day))
        day += timedelta(days=1)
    return statements


def ensure(conn: Connection, *, first: date | None = None, last: date | None = None) -> int:
    """Create the missing partitions (`create_statements`); how many were created. Commits
    each one (a short lock each); one the lock could not be had for is left for next time."""
    statements = create_statements(
        have={p.name for p in existing(conn)}, default=_has_default(conn), first=first, last=last
    )
    conn.commit()
    created = 0
    for statement in statements:
        try:
            conn.execute(text(f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS}"))
            conn.execute(text(statement))
            conn.commit()
            created += 1
        except DBAPIError as exc:  # lock not had, or the default already holds such rows
            conn.rollback()
            log.warning(
                "partition not created (%s): %s", statement.split(" PARTITION")[0], exc.orig
            )
    return created


def rows_in(conn: Connection, name: str) -> int:
    """How many transitions the partition `name` holds."""
    return int(conn.execute(text(f"SELECT count(*) FROM {name}")).scalar_one())


def detach(conn: Connection, name: str, *, tries: int = 25) -> bool:
    """DETACH the partition inside the open transaction: its exclusive lock on the log is
    asked for `LOCK_TIMEOUT_MS` at a time, so inserts never queue behind it for longer;
    False when it could not be had."""
    for attempt in range(tries):
        point = conn.begin_nested()
        try:
            conn.execute(text(f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS}"))
            conn.execute(text(f"ALTER TABLE {PARENT} DETACH PARTITION {name}"))
        except OperationalError as exc:
            point.rollback()
            if getattr(exc.orig, "sqlstate", None) != "55P03":  # lock_not_available
                raise
            time_module.sleep(0.05 * (attempt + 1))
            continue
        point.commit()
        return True
    return False


def drop(conn: Connection, name: str) -> None:
    """DROP a detached partition (in the caller's transaction)."""
    conn.execute(text(f"DROP TABLE {name}"))


def _has_default(conn: Connection) -> bool:
    return conn.execute(text("SELECT to_regclass(:t) IS NOT NULL"), {"t": DEFAULT}).scalar() is True


def maintain(engine: Engine) -> int:
    """Partitions ahead, if `transitions` is partitioned here; how many were created."""
    with engine.connect() as conn:
        if not is_partitioned(conn):
            return 0
        return ensure(conn)


async def maintain_forever(engine: Engine, *, every: float = 3600.0) -> None:
    """The background pass of `serve`/`worker` on PostgreSQL: partitions `AHEAD` days
    ahead, checked hourly (and at start)."""
    while True:
        try:
            created = await asyncio.to_thread(maintain, engine)
            if created:
                log.info("partitions: created %d ahead", created)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not outage(exc):
                log.exception("partition maintenance failed; trying again in %ss", every)
            else:  # every interval for as long as it lasts: one line each
                log.warning(
                    "partition maintenance failed: %s; trying again in %ss", outage_line(exc), every
                )
                log.debug("partition maintenance failed", exc_info=exc)
        await asyncio.sleep(every)
