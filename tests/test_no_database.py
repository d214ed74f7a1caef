"""A command that does not migrate, run where there is no order-saga database (the wrong
directory, an empty file, an empty PostgreSQL database): one line naming where it looked
and `order-saga db upgrade`, exit 1, and no empty `order-saga.db` left behind. `serve`,
`worker` and `db upgrade` create and migrate as before."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.database import create_pg_database, drop_pg_database
from tests.support.in_process import Run, first_in_a_process
from tests.support.processes import run_cli

SOME_ID = "00000000-0000-0000-0000-000000000001"
# Every command that uses the orders database without migrating it.
DATABASE_COMMANDS = [
    ("orders", "list"),
    ("orders", "show", SOME_ID),
    ("orders", "cancel", SOME_ID),
    ("orders", "resolve", SOME_ID, "--reason", "fixed"),
    ("resume",),
    ("resume", "--order", SOME_ID),
    ("check-upgrade",),
    ("diagram", "--order", SOME_ID),
    ("keys", "list"),
    ("keys", "create", "alice", "--role", "reader"),
    ("keys", "revoke", "alice"),
    ("webhooks", "list"),
    ("webhooks", "add", "http://127.0.0.1:9/hook"),
    ("webhooks", "remove", "1"),
    ("webhooks", "test", "1"),
    ("events", "list"),
    ("events", "redeliver", f"{SOME_ID}:1"),
    ("prune", "--keep", "1"),
    ("relay",),
    ("serve", "--no-migrate"),
]
# Each command once as a tuple of its args (a case of one argument), the first in a process.
ONE_IN_A_PROCESS = first_in_a_process(
    [(a,) for a in DATABASE_COMMANDS], ids=lambda c: " ".join(c[0])
)
HINT = "create it with `order-saga db upgrade`, or point ORDER_SAGA_DATABASE_URL at yours"


def hint(where: str, what: str) -> str:
    return f"order-saga: no order-saga database at {where} ({what}): {HINT}"


@pytest.mark.parametrize(("args", "run"), ONE_IN_A_PROCESS)
def test_a_command_where_there_is_no_database_says_so_and_creates_none(
    args: tuple[str, ...], run: Run, tmp_path: Path
) -> None:
    result = run(*args, cwd=tmp_path)  # the default: sqlite:///order-saga.db, here
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip() == hint(str(tmp_path / "order-saga.db"), "no such file")
    assert list(tmp_path.iterdir()) == []  # no empty order-saga.db (nor -wal, -shm) left


@pytest.fixture(scope="module")
def empty_pg() -> Iterator[str]:
    name = f"order_saga_empty_{uuid.uuid4().hex[:12]}"
    yield create_pg_database(name)
    drop_pg_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def never_migrated(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(URL, where the line names it) of a database that is there without the schema: an
    empty SQLite file, an empty PostgreSQL database (its URL's userinfo masked)."""
    if request.param == "sqlite":
        path = tmp_path / "empty.db"
        path.touch()
        return f"sqlite:///{path}", str(path)
    url: str = request.getfixturevalue("empty_pg")
    with_password = url.replace("postgres@", "postgres:hunter2@", 1)  # trust auth: ignored
    return with_password, url.replace("postgres@", "***@", 1)


@pytest.mark.parametrize(("args", "run"), ONE_IN_A_PROCESS)
def test_a_database_never_migrated_gets_the_same_line(
    args: tuple[str, ...], run: Run, never_migrated: tuple[str, str]
) -> None:
    url, where = never_migrated
    result = run(*args, ORDER_SAGA_DATABASE_URL=url)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip() == hint(where, "no orders table: never migrated")


def test_db_upgrade_creates_the_database_the_other_commands_then_use(tmp_path: Path) -> None:
    created = run_cli("db", "upgrade", cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    assert (tmp_path / "order-saga.db").is_file()
    listed = run_cli("orders", "list", "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr


@pytest.mark.parametrize(
    ("database", "run"),
    first_in_a_process(
        ["file:{dir}/uri.db?uri=true", "file:{dir}/uri.db?mode=rw&uri=true", "~/tilde.db"]
    ),
)
def test_uri_and_tilde_paths_are_looked_for_where_sqlite_opens_them(
    database: str, run: Run, tmp_path: Path
) -> None:
    """A URI filename (`file:…?uri=true`) is checked at its path, not opened (which made
    an empty file there); `~` is no home directory to SQLite, only a directory of that
    name under the working one, so that is where it is looked for (and named)."""
    url = "sqlite:///" + database.format(dir=tmp_path)
    result = run("orders", "list", cwd=tmp_path, ORDER_SAGA_DATABASE_URL=url)
    assert result.returncode == 1, result.stderr
    where = tmp_path / "uri.db" if database.startswith("file:") else tmp_path / "~/tilde.db"
    assert result.stderr.strip() == hint(str(where), "no such file")
    assert list(tmp_path.iterdir()) == []  # nothing created by the look
