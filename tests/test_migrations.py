"""`alembic upgrade head` yields exactly the models' schema (no drift), on both databases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, event, inspect, text
from sqlmodel import SQLModel

import fsm.models  # noqa: F401
from fsm import partitions
from fsm.migrate import alembic_config, upgrade
from fsm.sql import parse_utc
from fsm.store import make_engine
from tests.support.database import create_pg_database, drop_pg_database

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_db(request: pytest.FixtureRequest, tmp_path: Path, worker_id: str) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/migrated.db"
        return
    name = f"order_saga_migrations_{worker_id}_{os.getpid()}"
    yield create_pg_database(name)
    drop_pg_database(name)


def test_upgrade_head_matches_the_models(empty_db: str) -> None:
    upgrade(empty_db)
    engine = make_engine(empty_db)
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn,
            opts={
                "include_name": partitions.include_name,
                "include_object": partitions.include_object,
                "compare_type": True,
            },
        )
        diff = compare_metadata(context, SQLModel.metadata)
        tables = set(inspect(conn).get_table_names())
        version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
    engine.dispose()
    assert diff == [], f"models and migrations differ: {diff}"
    assert {"orders", "transitions", "alembic_version"} <= tables
    assert {"outbox_events", "outbox_deliveries", "event_destinations"} <= tables
    (head,) = ScriptDirectory.from_config(alembic_config(empty_db)).get_heads()
    assert version == head


def test_upgrade_is_idempotent(empty_db: str) -> None:
    upgrade(empty_db)
    upgrade(empty_db)  # at head already: nothing to do, no error


def test_a_migration_has_no_statement_time_limit_and_a_short_lock_wait(
    empty_db: str,
) -> None:
    """Revision 0007 copies the whole log in one statement, a state migration rewrites
    every order row: with the engine's 30 s statement timeout, a big database's upgrade
    rolled back, with no way to raise it. Read on the connection running the revisions."""
    seen: dict[str, object] = {}

    def record(conn: Any, *_: Any) -> None:
        if seen:
            return
        cursor = conn.connection.dbapi_connection.cursor()
        if conn.dialect.name == "sqlite":
            cursor.execute("PRAGMA busy_timeout")
            seen["lock"] = cursor.fetchone()[0]
        else:
            for setting in ("statement_timeout", "lock_timeout"):
                cursor.execute(f"SHOW {setting}")
                seen[setting] = cursor.fetchone()[0]
        cursor.close()

    event.listen(Engine, "after_cursor_execute", record)
    try:
        upgrade(empty_db)
    finally:
        event.remove(Engine, "after_cursor_execute", record)
    if empty_db.startswith("sqlite"):
        assert seen == {"lock": 5_000}
    else:
        assert seen == {"statement_timeout": "0", "lock_timeout": "5s"}


def test_plain_alembic_cli_works(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/cli.db"
    alembic = Path(sys.executable).parent / "alembic"
    result = subprocess.run(
        [str(alembic), "upgrade", "head"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"ORDER_SAGA_DATABASE_URL": url, "PATH": "/usr/bin", "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    engine = make_engine(url)
    with engine.connect() as conn:
        assert "orders" in inspect(conn).get_table_names()
        assert conn.execute(text("PRAGMA journal_mode")).scalar_one() == "wal"
    engine.dispose()


def test_plain_alembic_names_a_refused_url_never_its_password() -> None:
    """The URL is read from the same Settings as the app's; a refused one is alembic's
    one FAILED line naming the variable, not pydantic's error quoting the value."""
    alembic = Path(sys.executable).parent / "alembic"
    result = subprocess.run(
        [str(alembic), "upgrade", "head"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={
            "ORDER_SAGA_DATABASE_URL": "mysql://app:Sup3rSecret@db.internal/orders",
            "PATH": "/usr/bin",
            "PYTHONPATH": str(ROOT),
        },
    )
    said = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Sup3rSecret" not in said
    assert "Traceback" not in said
    assert "FAILED: invalid ORDER_SAGA_DATABASE_URL: " in result.stdout  # alembic prints it there


def test_the_outbox_stream_index_is_postgresql_s_alone(empty_db: str) -> None:
    upgrade(empty_db)
    engine = make_engine(empty_db)
    with engine.connect() as conn:
        names = {i["name"] for i in inspect(conn).get_indexes("outbox_events")}
        ddl = None
        if engine.dialect.name == "sqlite":  # the rowid, never reused: AUTOINCREMENT
            ddl = conn.exec_driver_sql(
                "SELECT sql FROM sqlite_master WHERE name = 'outbox_events'"
            ).scalar_one()
    engine.dispose()
    assert (partitions.OUTBOX_STREAM_INDEX in names) == (ddl is None)
    assert ddl is None or "position INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT" in ddl


async def test_an_upgrade_from_0007_keeps_what_was_owed_and_delivers_it(empty_db: str) -> None:
    """0008 (cursors): events already delivered stay delivered, those pending are still
    delivered (in order per order), the dead letters stay dead and redeliverable; the
    events committed after the upgrade follow."""
    from fsm import outbox_sql, subscriptions
    from fsm.destinations.webhook import new_secret
    from fsm.wiring import build_store
    from tests.support.endpoint import Endpoint
    from tests.support.events import FAST_EVENTS, out_of_order, relaying
    from tests.support.settings import saga_settings
    from tests.support.waiting import wait_until_async

    command.upgrade(alembic_config(empty_db), "0007")
    sqlite = empty_db.startswith("sqlite")
    first, second = uuid.uuid4(), uuid.uuid4()
    now = datetime.now(UTC)

    def key(u: uuid.UUID) -> object:
        return u.hex if sqlite else u

    rows = [  # order, seq, state at 0007
        (first, 0, "delivered"),
        (first, 3, "pending"),
        (first, 5, "pending"),
        (second, 0, "dead"),
    ]
    async with Endpoint() as endpoint:
        engine = make_engine(empty_db)
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO event_destinations (id, name, kind, url, secret, events, "
                    "created_at) VALUES (1, :u, 'webhook', :u, :s, :e, :t)"
                ),
                {"u": endpoint.url, "s": new_secret(), "e": ",order.created,", "t": now},
            )
            for n, (order, seq, state) in enumerate(rows):
                event_id = f"{order}:{seq}"
                at = now + timedelta(milliseconds=n)
                conn.execute(
                    text(
                        "INSERT INTO outbox_events (id, order_id, seq, type, created_at, body) "
                        "VALUES (:i, :o, :q, 'order.created', :t, :b)"
                    ),
                    {"i": event_id, "o": key(order), "q": seq, "t": at,
                     "b": json.dumps({"id": event_id, "subject": str(order)})},
                )  # fmt: skip
                conn.execute(
                    text(
                        "INSERT INTO outbox_deliveries (destination_id, event_id, order_id, "
                        "seq, state, attempts, next_attempt_at, created_at, retry_from) "
                        "VALUES (1, :i, :o, :q, :s, 1, :t, :t, :t)"
                    ),
                    {"i": event_id, "o": key(order), "q": seq, "s": state, "t": at},
                )
        engine.dispose()
        upgrade(empty_db)
        store = build_store(saga_settings(empty_db))
        try:
            dead = subscriptions.deliveries(store, failed=True)
            assert [d.event_id for d in dead] == [f"{second}:0"]
            later = (f"{first}:7", key(first), 7, "order.created", now, "")
            later = (*later[:5], json.dumps({"id": later[0], "subject": str(first)}))
            await store.committer.submit(
                lambda cursor: cursor.execute(outbox_sql.insert_event(store.dialect), later)
            )  # committed after the upgrade: through the cursor, behind the owed ones
            async with relaying(store, saga_settings(empty_db, **FAST_EVENTS)):
                await wait_until_async(lambda: len(endpoint.requests) >= 3, what="the owed")
                assert subscriptions.redeliver(store, f"{second}:0").count == 1
                await wait_until_async(lambda: len(endpoint.requests) >= 4, what="redelivered")
                await wait_until_async(
                    lambda: [(b.pending, b.dead) for b in subscriptions.backlog(store)] == [(0, 0)],
                    what="every delivery recorded",
                )
            assert [e["id"] for e in endpoint.events()] == [
                f"{first}:3",
                f"{first}:5",
                f"{first}:7",
                f"{second}:0",
            ]
            assert out_of_order(endpoint.events()) == []
        finally:
            store.close()
            store.engine.dispose()


# The revision that gives a rotated secret's overlap columns of its own (renumbered when
# another branch's revision lands first: this name alone changes).
OVERLAP_REVISION = "0012"


def _secrets(engine: Engine) -> dict[int, tuple[str | None, str | None, datetime | None]]:
    """Each destination's `secret`, `previous_secret` and `previous_until`, by id."""
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT id, secret, previous_secret, previous_until FROM event_destinations")
        )
        return {i: (secret, previous, parse_utc(until)) for i, secret, previous, until in rows}


async def test_an_upgrade_leaves_an_overlapping_secret_as_written_and_the_relay_signs_with_both(
    empty_db: str,
) -> None:
    """A webhook rotated with an overlap before the revision (`<new> <old>@<until>` in
    `secret`) comes out of it as it was: the release before, still running beside this
    one during a rolling deploy, reads that form (split, its relay signed with the new
    secret alone and cut its consumers' overlap short); this release's relay signs with
    both. Mid-deploy, that release may `rotate` again and write its form into `secret`:
    this release's relay signs with that form's two secrets."""
    from downstream.seed import ORDINARY_USER_ID, WIDGET_ID
    from fsm import subscriptions
    from fsm.destinations.webhook import new_secret
    from fsm.wiring import open_store
    from tests.support.endpoint import Endpoint
    from tests.support.events import FAST_EVENTS, relaying
    from tests.support.settings import saga_settings
    from tests.support.waiting import wait_until_async

    script = ScriptDirectory.from_config(alembic_config(empty_db))
    before = script.get_revision(OVERLAP_REVISION).down_revision
    assert isinstance(before, str)
    upgrade(empty_db, before)
    old, new, plain = new_secret(), new_secret(), new_secret()
    until = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    now = datetime.now(UTC)
    async with Endpoint() as endpoint:
        engine = make_engine(empty_db)
        try:
            with engine.begin() as conn:
                rows = [  # id, kind, url, secret, events
                    (1, "webhook", endpoint.url, f"{new} {old}@{until.timestamp():.0f}"),
                    (2, "webhook", "http://127.0.0.1:9/never", plain),
                    (3, "amqp", "amqp://***@127.0.0.1:5672/", None),
                ]
                for row_id, kind, url, secret in rows:
                    conn.execute(
                        text(
                            "INSERT INTO event_destinations (id, name, kind, url, secret, "
                            "events, created_at) VALUES (:i, :u, :k, :u, :s, :e, :t)"
                        ),
                        {"i": row_id, "u": url, "k": kind, "s": secret, "t": now,
                         "e": ",order.created," if row_id == 1 else ",order.failed,"},
                    )  # fmt: skip
                    conn.execute(  # a cursor before every event (none yet)
                        text(
                            "INSERT INTO outbox_cursors (destination_id, txid, position) "
                            "VALUES (:i, 0, 0)"
                        ),
                        {"i": row_id},
                    )
            upgrade(empty_db, OVERLAP_REVISION)
            assert _secrets(engine) == {
                1: (f"{new} {old}@{until.timestamp():.0f}", None, None),
                2: (plain, None, None),
                3: (None, None, None),
            }
        finally:
            engine.dispose()
        upgrade(empty_db)
        with open_store(saga_settings(empty_db)) as store:
            await store.create_order(user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1)
            async with relaying(store, saga_settings(empty_db, **FAST_EVENTS)):
                await wait_until_async(lambda: endpoint.requests, what="the event")
            (request,) = endpoint.requests
            assert request.signed_by(new) and request.signed_by(old)
            assert request.signatures == 2

            newer = new_secret()
            with store.engine.begin() as conn:
                conn.execute(
                    text("UPDATE event_destinations SET secret = :s WHERE id = 1"),
                    {"s": f"{newer} {new}@{until.timestamp():.0f}"},
                )
            webhook = subscriptions.find(store, "1")
            tested = await subscriptions.test_webhook(webhook, timeout=5.0)
        assert tested.delivered, tested.error
        last = endpoint.requests[-1]
        assert last.signed_by(newer) and last.signed_by(new) and not last.signed_by(old)


def test_a_downgrade_folds_an_overlap_back_into_secret(empty_db: str) -> None:
    """Before the revision, `secret` held a rotation's overlap as `<new> <old>@<until>`
    (epoch seconds): the downgrade writes it so, and the upgrade back leaves it so. A
    `secret` a release before the revision rotated meanwhile (its form already, or a plain
    secret that ended the columns' overlap) is left as it is: folding it again wrote a
    value no release could read."""
    from fsm import outbox, subscriptions
    from fsm.destinations.webhook import new_secret
    from fsm.wiring import open_store
    from tests.support.settings import saga_settings

    script = ScriptDirectory.from_config(alembic_config(empty_db))
    before = script.get_revision(OVERLAP_REVISION).down_revision
    assert isinstance(before, str)
    upgrade(empty_db, OVERLAP_REVISION)
    overlapping, ended = "http://127.0.0.1:9/overlapping", "http://127.0.0.1:9/ended"
    with open_store(saga_settings(empty_db)) as store:
        first = subscriptions.add_webhook(store, overlapping, outbox.DEFAULT_TYPES)
        subscriptions.add_webhook(store, ended, outbox.DEFAULT_TYPES)
        rotated = subscriptions.rotate(store, overlapping, overlap=3600)
        subscriptions.rotate(store, ended, overlap=3600)
        last = subscriptions.rotate(store, ended, overlap=0)  # ends the overlap at once
        mixed = subscriptions.add_webhook(store, "http://127.0.0.1:9/mixed", outbox.DEFAULT_TYPES)
        subscriptions.rotate(store, "http://127.0.0.1:9/mixed", overlap=3600)
        cut = subscriptions.add_webhook(store, "http://127.0.0.1:9/cut", outbox.DEFAULT_TYPES)
        subscriptions.rotate(store, "http://127.0.0.1:9/cut", overlap=3600)
    assert rotated.old_until is not None
    one, two = rotated.destination.id, last.destination.id
    three, four = mixed.destination.id, cut.destination.id
    theirs = f"{new_secret()} {new_secret()}@{rotated.old_until.timestamp():.0f}"
    plain = new_secret()
    engine = make_engine(empty_db)
    try:
        with engine.begin() as conn:  # the release before rotates them: `secret` alone
            for row_id, secret in ((three, theirs), (four, plain)):
                conn.execute(
                    text("UPDATE event_destinations SET secret = :s WHERE id = :i"),
                    {"s": secret, "i": row_id},
                )
        split = _secrets(engine)
        assert split[one] == (rotated.secret, first.secret, rotated.old_until)
        assert split[two] == (last.secret, None, None)
        command.downgrade(alembic_config(empty_db), before)
        with engine.connect() as conn:
            folded = dict(conn.execute(text("SELECT id, secret FROM event_destinations")).all())
            columns = {c["name"] for c in inspect(conn).get_columns("event_destinations")}
        until = f"{rotated.old_until.timestamp():.0f}"
        assert folded == {
            one: f"{rotated.secret} {first.secret}@{until}",
            two: last.secret,
            three: theirs,
            four: plain,
        }
        assert {"previous_secret", "previous_until", "previous_for"}.isdisjoint(columns)
        upgrade(empty_db, OVERLAP_REVISION)
        assert _secrets(engine) == {i: (secret, None, None) for i, secret in folded.items()}
    finally:
        engine.dispose()
