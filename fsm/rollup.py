"""The heatmap's roll-up (issue 18 §4): `roll` folds the transition log past a cursor into
`heat_totals` (per edge and bucket of the stay it ended, all time) and `heat_hours` (the
same per hour, the last KEEP_HOURS hours), so that `fsm.queries.heat` reads a few
thousand rolled rows and the transitions past the cursor instead of the whole log.

Off the hot path: the engine never writes these tables (a counter row per edge updated in
each transition's commit would make every worker's commits wait on the same rows). `serve`
and `worker` roll every HEAT_ROLL_INTERVAL seconds and the console's heatmap rolls before
it reads; a roll that cannot run leaves the heatmap exact (it reads more of the log), only
slower.

The cursor is an id of the log, so it must never pass a transition that commits later
with a lower id. SQLite has one writer at a time, and it numbers its rows after every
committed one (AUTOINCREMENT: after every one ever written, deleted ones included, or a
prune of the newest rows would hand their ids, now behind the cursor, to new ones): every
id up to the max(id) a reader sees is committed. On PostgreSQL ids are handed out before
commit, so the roll first takes `LOCK TABLE transitions IN SHARE MODE` for an instant:
it waits (at most LOCK_WAIT_MS) until every transaction then writing the log has
committed, reads max(id), and lets go; writers queue behind it meanwhile.
Each chunk is written in one short transaction that moves the cursor by compare-and-set:
two rolls never fold the same rows, and no write lock is held while a chunk is read and
counted.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, delete, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from fsm import sql
from fsm.queries import (
    KEEP_HOURS,
    ended_stays,
    heat_cursor,
    heat_hours,
    heat_totals,
    hour_of,
    stay_bucket,
    transitions,
    utcnow,
)
from fsm.sql import as_utc

log = logging.getLogger("order_saga.rollup")
CHUNK = 100_000  # transitions folded per transaction
BACKGROUND_CHUNK = 20_000  # per pass of `roll_forever` (one thread, a second or so)
LOCK_WAIT_MS = 200  # PostgreSQL: the longest the roll waits for the log's writers
_KEYS = ("scope", "trigger", "from_state", "to_state", "bucket")


def _committed_top(engine: Engine) -> int | None:
    """PostgreSQL: an id below which every transition is committed (None: writers did not
    finish within LOCK_WAIT_MS; nothing is rolled this time)."""
    try:
        with engine.begin() as conn:
            for statement in sql.pg_wait_for_log_writers(lock_ms=LOCK_WAIT_MS):
                conn.exec_driver_sql(statement)
            return int(
                conn.execute(select(func.coalesce(func.max(transitions.c.id), 0))).scalar_one()
            )
    except OperationalError as exc:
        log.info("heatmap roll-up skipped this time: %s", sql.first_line(exc.orig))
        return None


def _add(conn: Any, table: Any, counts: Counter[tuple[Any, ...]], keys: tuple[str, ...]) -> None:
    if not counts:
        return
    insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    rows = [{**dict(zip(keys, key, strict=True)), "n": n} for key, n in counts.items()]
    for start in range(0, len(rows), 2_000):  # multi-row VALUES, under any bind limit
        statement = insert(table).values(rows[start : start + 2_000])
        statement = statement.on_conflict_do_update(
            index_elements=list(keys), set_={"n": table.c.n + statement.excluded.n}
        )
        conn.execute(statement)


def roll(engine: Engine, *, chunk: int = CHUNK, chunks: int | None = None) -> int:
    """Fold every committed transition past the cursor into the roll-up, `chunk` at a
    time (at most `chunks` of them); drop hours older than KEEP_HOURS. Returns how many
    were folded.

    Each chunk is read and counted outside any write lock; the write is one short
    transaction that moves the cursor only from where the chunk began (compare and set):
    when another roll moved it meanwhile, nothing is written and the chunk is read again."""
    postgres = engine.dialect.name == "postgresql"
    top = _committed_top(engine) if postgres else None
    if postgres and top is None:
        return 0
    insert = pg_insert if postgres else sqlite_insert
    cursor = select(heat_cursor.c.rolled_id).where(heat_cursor.c.id == 1)
    folded = done = 0
    while chunks is None or done < chunks:
        with engine.connect() as conn:
            start = int(conn.execute(cursor).scalar_one_or_none() or 0)
            end = top
            if end is None:  # SQLite: a writer's ids come after every committed one
                newest = select(func.coalesce(func.max(transitions.c.id), 0))
                end = int(conn.execute(newest).scalar_one())
            end = min(end, start + chunk)
            if end <= start:
                return folded
            t = transitions
            rows = conn.execute(ended_stays(t.c.id > start, t.c.id <= end)).all()
        totals: Counter[tuple[Any, ...]] = Counter()
        hours: Counter[tuple[Any, ...]] = Counter()
        oldest = hour_of(utcnow()) - timedelta(hours=KEEP_HOURS)
        for scope, trigger, a, b, _, _, at, entered in rows:
            key = (scope, trigger, a, b, stay_bucket(at, entered))
            totals[key] += 1
            hour = hour_of(as_utc(at) or at)
            if hour >= oldest:
                hours[(hour, *key)] += 1
        with engine.begin() as conn:
            conn.execute(insert(heat_cursor).values(id=1, rolled_id=0).on_conflict_do_nothing())
            moved = conn.execute(
                update(heat_cursor)
                .where(heat_cursor.c.id == 1, heat_cursor.c.rolled_id == start)
                .values(rolled_id=end)
            )
            if moved.rowcount != 1:
                continue  # another roll folded these: nothing written, read again
            _add(conn, heat_totals, totals, _KEYS)
            _add(conn, heat_hours, hours, ("hour", *_KEYS))
            conn.execute(delete(heat_hours).where(heat_hours.c.hour < oldest))
        folded += len(rows)
        done += 1
    return folded


async def roll_forever(engine: Engine, *, interval: float) -> None:
    """The background fold of `serve` and `worker`: every `interval` seconds, in a worker
    thread, until cancelled; the heatmap's own load then folds only the last seconds' log
    (and the first load after an upgrade does not fold the whole log)."""
    while True:  # one chunk per thread: a shutdown waits for one chunk at most
        folded = await asyncio.to_thread(refresh, engine, chunk=BACKGROUND_CHUNK, chunks=1)
        await asyncio.sleep(interval if folded < BACKGROUND_CHUNK // 2 else 0.1)


def refresh(engine: Engine, **how: Any) -> int:
    """`roll` (`how`: its chunk sizes), logging instead of raising when it cannot run now
    (a busy database, a read-only role): the heatmap is exact without it, only slower."""
    try:
        return roll(engine, **how)
    except SQLAlchemyError as exc:
        log.warning("heatmap roll-up failed: %s", sql.first_line(getattr(exc, "orig", exc)))
        return 0
