"""Apply the Alembic migrations programmatically (`order-saga db upgrade`, `serve`).

The migrations ship inside the package (the wheel maps the top-level `migrations/` to
`fsm/migrations`, see pyproject.toml), so an installed `order-saga` needs neither the
source tree nor `alembic.ini`; in a source checkout they are read where they are, and
`alembic upgrade head` with the top-level `alembic.ini` keeps working.

A rolling deploy runs the next release's `db upgrade` while this one still serves (README,
"Upgrading the machine safely"), so a revision this release does not ship is taken as a
newer release's: `migrate` leaves such a database as it is and lets this release start on
it, as long as every table and column this release uses is still there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect
from sqlmodel import SQLModel

import fsm.models  # noqa: F401  (registers the tables this release uses on SQLModel.metadata)
from fsm.engine import make_engine

PACKAGED = Path(__file__).resolve().parent / "migrations"  # installed from a wheel
SOURCE = Path(__file__).resolve().parent.parent / "migrations"  # a checkout, editable


def script_location() -> Path:
    for candidate in (PACKAGED, SOURCE):
        if (candidate / "env.py").is_file():
            return candidate
    raise FileNotFoundError(f"no migrations in {PACKAGED} or {SOURCE}")


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(script_location()))
    config.set_main_option("path_separator", "os")
    config.attributes["url"] = url
    config.attributes["configure_logger"] = False
    return config


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


class IncompatibleSchema(Exception):
    """The database cannot serve this release: behind it with migrations turned off, or
    migrated by a newer release that dropped or renamed a table or column this one uses."""


@dataclass(frozen=True)
class Schema:
    """Where a database stands against this release's revisions."""

    database: tuple[str, ...]  # its `alembic_version` rows; () when never migrated
    head: tuple[str, ...]  # this release's newest revision(s)
    unknown: tuple[str, ...]  # its revisions this release does not ship: a newer release's
    missing: tuple[str, ...]  # "table" or "table.column" this release uses that it lacks

    @property
    def ahead(self) -> bool:
        return bool(self.unknown)

    @property
    def current(self) -> bool:
        return self.database == self.head

    def as_json(self) -> dict[str, object]:
        return {
            "database_revision": list(self.database),
            "head_revision": list(self.head),
            "ahead": self.ahead,
            "current": self.current,
            "missing": list(self.missing),
        }

    def line(self) -> str:
        """One line naming both revisions (`check-upgrade`, the start-up warning)."""
        at = f"database at revision {_names(self.database)}"
        if self.current:
            return f"{at}, this release's head"
        if not self.ahead:
            return (
                f"{at}, behind this release's head {_names(self.head)}: run `order-saga db upgrade`"
            )
        where = (
            f"{at}, ahead of this release's head {_names(self.head)} (migrated by a newer release)"
        )
        if self.missing:
            return f"{where}, which lacks {', '.join(self.missing)} that this release uses"
        return f"{where}: this release runs on it without migrating"


def _names(revisions: tuple[str, ...]) -> str:
    return ", ".join(revisions) or "none"  # never migrated


def schema(url: str, engine: Engine | None = None) -> Schema:
    """Read the database's revision and compare it with this release's (two small reads;
    the tables and columns are compared only when the database is ahead). Through
    `engine` when given (a command's, `fsm.wiring.open_engine`), else a read pool of its
    own for the migration's look, disposed after it."""
    script = ScriptDirectory.from_config(alembic_config(url))
    known = {revision.revision for revision in script.walk_revisions()}
    reads = make_engine(url) if engine is None else engine
    try:
        with reads.connect() as conn:
            database = tuple(sorted(MigrationContext.configure(conn).get_current_heads()))
            unknown = tuple(r for r in database if r not in known)
            missing = _missing(conn) if unknown else ()
    finally:
        if engine is None:
            reads.dispose()
    return Schema(database, tuple(sorted(script.get_heads())), unknown, missing)


def _missing(conn: Connection) -> tuple[str, ...]:
    """The tables and columns of this release's models that the database does not have."""
    inspector = inspect(conn)
    tables = set(inspector.get_table_names())
    missing: list[str] = []
    for table in SQLModel.metadata.sorted_tables:
        if table.name not in tables:
            missing.append(table.name)
            continue
        have = {column["name"] for column in inspector.get_columns(table.name)}
        missing.extend(f"{table.name}.{c.name}" for c in table.columns if c.name not in have)
    return tuple(missing)


def migrate(url: str, *, apply: bool = True) -> Schema:
    """The migration `serve` and `db upgrade` run at start: up to this release's head, or,
    when a newer release already migrated the database, nothing (it is returned `ahead`;
    the caller warns). Raises `IncompatibleSchema` when this release cannot run on the
    database: the newer schema lacks what it uses, or (`apply=False`) it is behind."""
    found = schema(url)
    if found.ahead:
        if found.missing:
            raise IncompatibleSchema(f"{found.line()}: run the release that migrated it")
        return found
    if apply:
        upgrade(url)
    elif not found.current:
        raise IncompatibleSchema(f"{found.line()} first (or start without --no-migrate)")
    return found
