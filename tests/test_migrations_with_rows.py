"""Migrations run over a database that holds orders, on SQLite and PostgreSQL: an upgrade
from an old revision keeps every order and its log, a downgrade and the upgrade back keep
them too, and a run that fails partway leaves the database exactly as it found it (SQLite
rebuilds a table to change it, which its foreign keys refused while the log referenced
`orders`; and a failed run used to keep its first revisions' columns without recording
them, so every later attempt failed on a duplicate column)."""

from __future__ import annotations

import os
import sqlite3
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect, text
from sqlmodel import SQLModel

from fsm.migrate import alembic_config, upgrade
from fsm.store import make_engine
from fsm.version import MACHINE_VERSION
from tests.support.database import create_pg_database, drop_pg_database

ORDERS, STEPS = 3, 4  # each order with this many transitions


@pytest.fixture(params=["sqlite", "postgresql"])
def blank_db(request: pytest.FixtureRequest, tmp_path: Path, worker_id: str) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/rows.db"
        return
    name = f"order_saga_migration_rows_{worker_id}_{os.getpid()}"
    yield create_pg_database(name)
    drop_pg_database(name)


def revision(url: str) -> str:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return str(conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one())
    finally:
        engine.dispose()


def fill(url: str, *, machine_version: bool) -> list[str]:
    """Orders and their logs as the revision at 0001 (or 0002: `machine_version`) wrote
    them, in its own columns; the ids as text."""
    engine = make_engine(url)
    sqlite = engine.dialect.name == "sqlite"
    extra = ", machine_version" if machine_version else ""
    value = ", :mv" if machine_version else ""
    ids = [uuid.uuid4() for _ in range(ORDERS)]
    start = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
    with engine.begin() as conn:
        for n, oid in enumerate(ids):
            key = oid.hex if sqlite else oid
            created = start + timedelta(days=n)
            conn.execute(
                text(
                    "INSERT INTO orders (id, idempotency_key, user_id, product_id, quantity,"
                    " amount, state, status, payment_state, inventory_state, shipping_state,"
                    " version, attempts, cancel_requested, created_at, updated_at"
                    f"{extra}) VALUES (:id, :key, 1, 2, 1, 500, 'completed', 'completed',"
                    " 'succeeded', 'succeeded', 'succeeded', :steps, '{}', false, :at, :at"
                    f"{value})"
                ),
                {"id": key, "key": f"k{n}", "steps": STEPS, "at": created, "mv": "0ld0ld0ld0ld"},
            )
            for seq in range(STEPS):
                conn.execute(
                    text(
                        "INSERT INTO transitions (order_id, seq, scope, trigger, from_state,"
                        f" to_state, detail, created_at{extra}) VALUES (:id, :seq, 'order',"
                        f" 'go', 'a', 'b', NULL, :at{value})"
                    ),
                    {"id": key, "seq": seq, "at": created, "mv": "0ld0ld0ld0ld"},
                )
    engine.dispose()
    return sorted(str(oid) for oid in ids)


def kept(engine: Engine) -> tuple[list[str], int]:
    """The orders (ids as text) and how many transitions belong to them."""
    with engine.connect() as conn:
        ids = conn.execute(text("SELECT id FROM orders")).scalars().all()
        logged = conn.execute(
            text("SELECT count(*) FROM transitions t JOIN orders o ON o.id = t.order_id")
        ).scalar_one()
    return sorted(str(uuid.UUID(str(i))) for i in ids), int(logged)


def leftovers(engine: Engine) -> list[str]:
    """Tables a batch rebuild or a migration's copy left behind."""
    with engine.connect() as conn:
        names = inspect(conn).get_table_names()
    return [n for n in names if n.startswith("_alembic_tmp") or n.endswith(("_old", "_new"))]


@pytest.mark.parametrize("start", ["0001", "0002"])
def test_an_upgrade_with_orders_keeps_every_order_and_its_log(blank_db: str, start: str) -> None:
    upgrade(blank_db, start)
    ids = fill(blank_db, machine_version=start != "0001")
    upgrade(blank_db)
    engine = make_engine(blank_db)
    try:
        assert kept(engine) == (ids, ORDERS * STEPS)
        with engine.connect() as conn:
            versions = set(conn.execute(text("SELECT machine_version FROM orders")).scalars())
            owners = set(conn.execute(text("SELECT created_by FROM orders")).scalars())
            mismatched = conn.execute(
                text(
                    "SELECT count(*) FROM transitions t JOIN orders o ON o.id = t.order_id"
                    " WHERE t.order_created_at <> o.created_at"
                )
            ).scalar_one()
        assert versions == ({MACHINE_VERSION} if start == "0001" else {"0ld0ld0ld0ld"})
        assert owners == {""} and mismatched == 0
        assert leftovers(engine) == []
    finally:
        engine.dispose()
    (head,) = ScriptDirectory.from_config(alembic_config(blank_db)).get_heads()
    assert revision(blank_db) == head


def test_a_downgrade_to_0001_and_back_keeps_the_orders(blank_db: str) -> None:
    upgrade(blank_db, "0001")
    ids = fill(blank_db, machine_version=False)
    upgrade(blank_db)
    config = alembic_config(blank_db)
    command.downgrade(config, "0002")  # 0003's rebuild of `orders`, with the log's key back
    assert revision(blank_db) == "0002"
    command.downgrade(config, "0001")
    engine = make_engine(blank_db)
    try:
        assert kept(engine) == (ids, ORDERS * STEPS)
        assert leftovers(engine) == []
        upgrade(blank_db)
        assert kept(engine) == (ids, ORDERS * STEPS)
        assert leftovers(engine) == []
    finally:
        engine.dispose()


def test_0013_counts_no_interruption_for_any_order_there_or_placed_by_the_release_before(
    blank_db: str,
) -> None:
    """orders.interruptions comes in at 0 for every order, and a release before it (its
    INSERT does not name the column: a rolling deploy) still places orders, at 0; the
    downgrade drops the column and keeps the orders."""
    upgrade(blank_db, "0001")
    ids = fill(blank_db, machine_version=False)
    upgrade(blank_db, "0012")
    upgrade(blank_db)
    engine = make_engine(blank_db)
    sqlite = engine.dialect.name == "sqlite"
    placed = uuid.uuid4()
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO orders (id, user_id, product_id, quantity, state, status,"
                    " payment_state, inventory_state, shipping_state, version, attempts,"
                    " cancel_requested, created_at, updated_at, machine_version, created_by)"
                    " VALUES (:id, 1, 2, 1, 'pending', 'pending', 'pending', 'pending',"
                    " 'pending', 0, '{}', false, :at, :at, 'old', '')"
                ),
                {"id": placed.hex if sqlite else placed, "at": datetime.now(UTC)},
            )
            counts = conn.execute(text("SELECT interruptions FROM orders")).scalars().all()
        assert counts == [0] * (ORDERS + 1)
        command.downgrade(alembic_config(blank_db), "0012")
        with engine.connect() as conn:
            columns = {c["name"] for c in inspect(conn).get_columns("orders")}
        assert "interruptions" not in columns
        assert kept(engine)[0] == sorted([*ids, str(placed)])
        upgrade(blank_db)
        assert kept(engine) == (sorted([*ids, str(placed)]), ORDERS * STEPS)
    finally:
        engine.dispose()


def test_a_run_that_fails_partway_keeps_nothing_of_it(blank_db: str) -> None:
    """0003 meets a table in its way: the run stops there, and 0002's column, which went
    in first, goes too (the version still says 0001); out of the way, the run completes."""
    upgrade(blank_db, "0001")
    ids = fill(blank_db, machine_version=False)
    engine = make_engine(blank_db)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE api_keys (stray INTEGER)"))
        with pytest.raises(Exception, match="api_keys"):
            upgrade(blank_db)
        assert revision(blank_db) == "0001"
        with engine.connect() as conn:
            columns = {c["name"] for c in inspect(conn).get_columns("orders")}
        assert "machine_version" not in columns
        assert leftovers(engine) == []
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE api_keys"))
        upgrade(blank_db)
        assert kept(engine) == (ids, ORDERS * STEPS)
    finally:
        engine.dispose()


def test_sqlite_a_run_that_would_leave_a_dangling_key_is_refused(tmp_path: Path) -> None:
    """The keys are off while SQLite's migrations rebuild tables, so they are checked at
    the end, inside the run's transaction: a log row whose order is gone fails the run,
    named, and nothing of it is kept."""
    url = f"sqlite:///{tmp_path}/dangling.db"
    upgrade(url, "0001")
    fill(url, machine_version=False)
    raw = sqlite3.connect(tmp_path / "dangling.db")  # a connection with the keys off
    raw.execute("DELETE FROM orders WHERE idempotency_key = 'k0'")
    raw.commit()
    raw.close()
    with pytest.raises(Exception, match="foreign key|referenc"):
        upgrade(url, "0002")
    assert revision(url) == "0001"


def transitions_ddl(url: str) -> str:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return str(
                conn.exec_driver_sql(
                    "SELECT sql FROM sqlite_master WHERE name = 'transitions'"
                ).scalar_one()
            )
    finally:
        engine.dispose()


def test_sqlite_the_log_never_reuses_an_id_the_roll_up_has_passed(tmp_path: Path) -> None:
    """A database from before 0010 whose newest orders were pruned after a roll: the
    upgrade keeps every row and its id, and the next transition comes after the cursor
    (the roll-up would never fold one at or below it)."""
    url = f"sqlite:///{tmp_path}/reuse.db"
    upgrade(url, "0001")
    fill(url, machine_version=False)
    upgrade(url, "0009")
    assert "AUTOINCREMENT" not in transitions_ddl(url)
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            ids = conn.execute(text("SELECT id FROM transitions ORDER BY id")).scalars().all()
            conn.execute(text("INSERT INTO heat_cursor (id, rolled_id) VALUES (1, :top)"),
                         {"top": ids[-1]})  # fmt: skip
            conn.execute(text("DELETE FROM transitions WHERE id > :keep"), {"keep": ids[1]})
        upgrade(url)
        assert "AUTOINCREMENT" in transitions_ddl(url)
        with engine.begin() as conn:
            assert (
                conn.execute(text("SELECT id FROM transitions ORDER BY id")).scalars().all()
                == ids[:2]
            )
            line = conn.execute(text("SELECT * FROM transitions LIMIT 1")).mappings().one()
            conn.execute(
                text(
                    "INSERT INTO transitions (order_id, seq, scope, trigger, from_state, to_state,"
                    " created_at, machine_version, order_created_at) VALUES (:order_id, 99,"
                    " :scope, :trigger, :from_state, :to_state, :created_at, :machine_version,"
                    " :order_created_at)"
                ),
                dict(line),
            )
            newest = conn.execute(text("SELECT max(id) FROM transitions")).scalar_one()
        assert newest > ids[-1]
    finally:
        engine.dispose()


def test_sqlite_a_new_database_numbers_its_log_with_autoincrement(tmp_path: Path) -> None:
    """Migrated or created from the models (the tests' schema), the same table."""
    migrated, created = f"sqlite:///{tmp_path}/migrated.db", f"sqlite:///{tmp_path}/created.db"
    upgrade(migrated)
    engine = make_engine(created)
    SQLModel.metadata.create_all(engine)
    engine.dispose()
    assert "AUTOINCREMENT" in transitions_ddl(migrated)
    assert "AUTOINCREMENT" in transitions_ddl(created)
