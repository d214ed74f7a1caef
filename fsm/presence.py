"""Is there an order-saga database where the settings point, before a command that does not
migrate opens it? A SQLite file that is not there must not be created by the look (SQLite
creates a file on connect: a command run from the wrong directory left an empty
`order-saga.db` behind), and one without this release's tables (never migrated; on
PostgreSQL an empty database) is named as such, not as a failed query.

Only says what is missing; the command words it (`order_saga.console.database_settings`).
Neither migrates nor creates anything (`fsm.migrate` does, for `serve` and `db upgrade`).
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from fsm.settings import Settings
from fsm.wiring import open_engine

# The table every command reads first: without it the schema was never made here.
CORE_TABLE = "orders"
NO_FILE = "no such file"
NO_TABLES = f"no {CORE_TABLE} table: never migrated"


def sqlite_path(url: str) -> Path | None:
    """The absolute path of a SQLite database file (relative URLs are the working
    directory's); None for PostgreSQL, or for a SQLite URI filename (`file:…?uri=true`)
    whose path SQLite itself resolves."""
    parsed = make_url(url)
    if not parsed.drivername.startswith("sqlite") or not parsed.database:
        return None
    database = parsed.database
    if database.startswith("file:"):  # a URI filename: its path, without its query
        database = database.removeprefix("file:").split("?", 1)[0].removeprefix("//localhost")
        if not database or parsed.query.get("mode") == "memory" or database == ":memory:":
            return None
    elif parsed.query.get("uri") == "true":
        return None
    # As SQLite reads it: `~` is not this user's home there, only a directory named so.
    return Path(database).absolute()


def missing(settings: Settings) -> str | None:
    """What is missing at the settings' database for a command that does not migrate:
    NO_FILE (a SQLite file that is not there: nothing is opened, so nothing is created),
    NO_TABLES (the database is there without this release's schema), or None. A database
    that cannot be reached is None too: the command's own connection then fails and says
    why. Looked at through `open_engine` (the settings' lock and statement timeouts)."""
    path = sqlite_path(settings.database_url)
    if path is not None and not path.exists():
        return NO_FILE
    with open_engine(settings) as engine:
        try:
            with engine.connect() as conn:
                return None if inspect(conn).has_table(CORE_TABLE) else NO_TABLES
        except SQLAlchemyError:
            return None
