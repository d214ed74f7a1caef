"""Checking who calls while the database is down or busy (issue 17 x SPEC's 503): a key or
a console session that cannot be checked is a 503 with Retry-After, like any route whose
database is unavailable, never a 500; and checking a key only reads, so a writer holding
SQLite's write lock (or a row lock on PostgreSQL) never fails a reader's GET. Real
databases: PostgreSQL behind a proxy that is cut, SQLite with another connection holding
BEGIN IMMEDIATE."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, text
from sqlalchemy.engine import make_url

from api.app import create_app
from api.auth import Authenticator
from fsm import keys
from fsm.roles import Role
from fsm.store import Store, make_engine
from tests.support.api import console_sign_in
from tests.support.proxy import CuttableProxy
from tests.support.settings import cli_settings
from tests.support.waiting import wait_until


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def assert_unavailable(answer: Any) -> None:
    assert answer.status_code == 503, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.headers["Retry-After"]
    assert answer.json()["dependency"] == "database"


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)  # a server to cut
def test_a_key_or_session_checked_while_postgresql_is_down_is_a_503(
    db_url: str, services_url: str, store: Store
) -> None:
    team = {
        n: keys.create_key(engine=store.engine, name=n, role=r)
        for n, r in {"warm": Role.READER, "cold": Role.READER, "ops": Role.OPERATOR}.items()
    }
    direct = make_url(db_url)
    with CuttableProxy(direct.port or 5432) as proxy:
        through = direct.set(port=proxy.port).render_as_string(hide_password=False)
        settings = cli_settings(through, services_url, db_lock_timeout=1.0, cookie_secure=False)
        with TestClient(create_app(settings, sweep=False), raise_server_exceptions=False) as c:
            assert c.get("/orders", headers=bearer(team["warm"])).status_code == 200
            signed = console_sign_in(c, team["ops"])
            assert signed.status_code == 303, signed.text  # its session not checked yet
            proxy.cut()
            # a key never looked up: its lookup cannot be made
            assert_unavailable(c.get("/orders", headers=bearer(team["cold"])))
            # the console session's key cannot be re-checked
            assert_unavailable(c.get("/ui/heatmap"))
            # a public route still answers for itself (health says why), never a 500
            health = c.get("/healthz", headers=bearer(team["cold"]))
            assert health.status_code in (200, 503), health.text
            assert health.json().get("code") != "internal"
            proxy.restore()
            wait_until(
                lambda: c.get("/orders", headers=bearer(team["cold"])).status_code == 200,
                what="the key to be accepted once the database is back",
            )


@contextmanager
def writer_holding_the_lock(db_url: str, name: str) -> Iterator[None]:
    """Another process's transaction that holds the write lock (SQLite) or the key's row
    (PostgreSQL) until the block ends: a long commit, a `keys` command mid-way."""
    url = make_url(db_url)
    if url.get_backend_name() == "sqlite":
        other = sqlite3.connect(str(url.database), isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            other.execute("ROLLBACK")
            other.close()
        return
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            conn.execute(text("UPDATE api_keys SET role = role WHERE name = :n"), {"n": name})
            yield
            conn.rollback()
    finally:
        engine.dispose()


def test_a_key_is_checked_while_a_writer_holds_the_lock(
    db_url: str, services_url: str, store: Store
) -> None:
    """Before, every uncached key lookup wrote `last_used_at` in the same transaction: with
    the write lock held elsewhere, a reader's GET failed ('database is locked', a 500)."""
    team = {
        n: keys.create_key(engine=store.engine, name=n, role=r)
        for n, r in {"boss": Role.ADMIN, "auditor": Role.READER}.items()
    }
    settings = cli_settings(db_url, services_url, db_lock_timeout=1.0)
    with TestClient(create_app(settings, sweep=False), raise_server_exceptions=False) as c:
        assert c.get("/orders?limit=1", headers=bearer(team["boss"])).status_code == 200
        with writer_holding_the_lock(db_url, "auditor"):
            answer = c.get("/orders?limit=1", headers=bearer(team["auditor"]))
            assert answer.status_code == 200, answer.text
    # the use is still noted, aside, when nothing is in the way
    used = {k.name: k.last_used_at for k in keys.list_keys(engine=store.engine)}
    assert used["boss"] is not None


def test_a_keys_use_is_written_at_most_once_a_minute(store: Store) -> None:
    """ "Last used" is a hint: one write per key per minute per process, not one per cache
    miss (each of which, on SQLite, waited for the write lock)."""
    ttl = 0.2
    secret = keys.create_key(engine=store.engine, name="busy-shop", role=Role.CLIENT)
    auth = Authenticator(store.engine, api_token=None, ttl=ttl)
    writes: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().startswith("UPDATE api_keys"):
            writes.append(statement)

    async def scenario() -> None:
        for _ in range(3):  # three lookups, each after the cache expired
            principal = await auth.bearer(secret.encode(), "/orders")
            assert principal is not None and principal.name == "busy-shop"
            await asyncio.sleep(ttl + 0.05)
        await auth.settle()

    event.listen(store.engine, "before_cursor_execute", count)
    try:
        asyncio.run(scenario())
    finally:
        event.remove(store.engine, "before_cursor_execute", count)
    assert len(writes) == 1, writes
    (info,) = keys.list_keys(engine=store.engine)
    assert info.last_used_at is not None


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # a write lock to hold
@pytest.mark.parametrize("pepper_made", [False, True], ids=["no-secret-yet", "pepper-made"])
def test_console_messages_come_back_once_the_secrets_can_be_read(
    db_url: str, services_url: str, store: Store, pepper_made: bool
) -> None:
    """The console signs its outcome messages with the deployment's session secret. When
    it could not be read at start (the database was down or locked) and authentication is
    off, nothing read it again: every action's message was dropped for the process's
    life. It is read when a message is next signed. With the key pepper made already and
    the session secret not, the start read the one and failed on the other: the pepper
    was kept, so the secrets counted as read, and the signer stayed missing for good."""
    if pepper_made:
        keys.server_secret(engine=store.engine, name="key_pepper")
    settings = cli_settings(db_url, services_url, db_lock_timeout=0.5)
    with ExitStack() as running:
        with writer_holding_the_lock(db_url, "-"):  # the secret cannot be made at start
            c = running.enter_context(TestClient(create_app(settings, sweep=False)))
        assert c.app.state.authenticator.sessions is None  # type: ignore[attr-defined]
        shown = c.post("/ui/events/redeliver", data={"event": "no-such-event"})
        assert shown.status_code == 200 and shown.url.path == "/ui/events", shown.text
        assert 'class="flash err"' in shown.text and "no-such-event" in shown.text, shown.text
