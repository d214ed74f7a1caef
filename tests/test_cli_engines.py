"""Every read pool a command opens waits as the settings say: ORDER_SAGA_DB_LOCK_TIMEOUT and
ORDER_SAGA_DB_STATEMENT_TIMEOUT reach the connections of `keys`, `check-upgrade`, `prune`,
`orders`, the look for a database before them, and `serve`'s checks before it serves (the
database clock, whether any key exists). Read on each engine's connection, after the
command's own statement on it: PostgreSQL's `SHOW lock_timeout` and `statement_timeout`,
SQLite's `PRAGMA busy_timeout` (its lock wait; SQLite has no statement timeout). The
commands run in this process (CliRunner) so each engine they make can be seen."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, event
from typer.main import get_command

from order_saga import cli
from tests.support.settings import cli_settings, saga_env

# Neither is a default (5 s, 30 s), and each its own value.
WAITS = {"db_lock_timeout": 1, "db_statement_timeout": 2}


def _expected(db_url: str) -> dict[str, Any]:
    if db_url.startswith("sqlite"):
        return {"busy_timeout": 1000}
    return {"lock_timeout": "1s", "statement_timeout": "2s"}


@contextmanager
def waits_seen() -> Iterator[dict[Engine, dict[str, Any]]]:
    """Each engine that runs a statement meanwhile -> its connection's bounded waits."""
    seen: dict[Engine, dict[str, Any]] = {}  # the engines held: none is collected meanwhile

    def record(conn: Any, *_: Any) -> None:
        if conn.engine in seen:
            return
        cursor = conn.connection.dbapi_connection.cursor()
        waits: dict[str, Any] = {}
        if conn.dialect.name == "sqlite":
            cursor.execute("PRAGMA busy_timeout")
            waits["busy_timeout"] = cursor.fetchone()[0]
        else:
            for setting in ("lock_timeout", "statement_timeout"):
                cursor.execute(f"SHOW {setting}")
                waits[setting] = cursor.fetchone()[0]
        cursor.close()
        seen[conn.engine] = waits

    event.listen(Engine, "after_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(Engine, "after_cursor_execute", record)


@pytest.mark.parametrize(
    "args",
    [
        ["keys", "list"],
        ["keys", "create", "ci", "--role", "client"],
        ["check-upgrade"],
        ["prune", "--older-than", "0", "--dry-run"],
        ["orders", "list"],
    ],
    ids=" ".join,
)
def test_a_command_s_engines_wait_as_the_settings_say(db_url: str, args: list[str]) -> None:
    env = saga_env(database_url=db_url, **WAITS)
    with waits_seen() as seen:
        result = CliRunner().invoke(get_command(cli.app), args, env=env)
    assert result.exit_code == 0, result.output
    assert seen, "the command ran no statement through an engine"
    assert list(seen.values()) == [_expected(db_url)] * len(seen)


def test_serve_s_checks_before_it_serves_wait_as_the_settings_say(db_url: str) -> None:
    settings = cli_settings(db_url, **WAITS)
    with waits_seen() as seen:
        cli._check_clock(settings)
        assert cli._any_keys(settings) is False
    assert len(seen) == (1 if db_url.startswith("sqlite") else 2)  # SQLite: no clock to check
    assert list(seen.values()) == [_expected(db_url)] * len(seen)
