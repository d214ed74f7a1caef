"""Alembic environment: the URL comes from the same Settings as the app (or from a
connection handed in by `fsm.migrate`), the target metadata from the SQLModel tables."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from alembic.util import CommandError
from sqlalchemy import Connection
from sqlmodel import SQLModel

import fsm.models  # noqa: F401  (registers the tables on SQLModel.metadata)
from fsm import partitions, sql
from fsm.engine import migration_engine
from fsm.settings import SETTINGS_ERRORS, get_settings, settings_problem

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = SQLModel.metadata


def _database_url() -> str:
    """ORDER_SAGA_DATABASE_URL, or alembic's one-line FAILED naming the variable, never
    its value (pydantic's error would print the URL, password and all)."""
    try:
        return get_settings().database_url
    except SETTINGS_ERRORS as exc:
        raise CommandError(settings_problem(exc)) from None


def run_migrations_offline() -> None:
    context.configure(
        url=_database_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    # no statement time limit, a short wait for a lock (fsm.engine.MIGRATION_LOCK_TIMEOUT)
    engine = migration_engine(config.attributes.get("url") or _database_url())
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()  # a failed run too: no connection left open behind it


def _run(connection: Connection) -> None:
    sqlite = connection.dialect.name == "sqlite"
    if sqlite:
        _foreign_keys(connection, on=False)
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,
        compare_type=True,
        include_name=partitions.include_name,  # the parent is the model; its days are not
        include_object=partitions.include_object,
        transactional_ddl=True,  # SQLite's DDL is transactional too: one run, one commit
    )
    try:
        with context.begin_transaction():
            if sqlite:
                connection.exec_driver_sql(sql.SQLITE_BEGIN)
            context.run_migrations()
            if sqlite:
                _no_dangling_keys(connection)
    finally:
        if sqlite:
            _foreign_keys(connection, on=True)


def _foreign_keys(connection: Connection, *, on: bool) -> None:
    """SQLite: batch mode changes a table by copying it and dropping the original, which
    foreign keys on refuse while other rows reference it (the log references `orders`
    before 0007). The pragma is a no-op inside a transaction, so it is set between
    transactions; and the driver is told to begin none of its own (it would begin one
    only at the first INSERT, leaving the DDL before it outside): the migrations' one
    transaction is ours, begun above, so a failed run leaves the database as it was."""
    connection.commit()
    level = connection.default_isolation_level if on else "AUTOCOMMIT"
    connection.execution_options(isolation_level=level)
    connection.exec_driver_sql(sql.sqlite_foreign_keys(on=on))
    connection.commit()


def _no_dangling_keys(connection: Connection) -> None:
    """With the keys off, nothing checked them: a migration that left a row pointing
    nowhere fails here, inside the transaction, and nothing of the run is kept."""
    dangling = connection.exec_driver_sql(sql.SQLITE_FOREIGN_KEY_CHECK).fetchall()
    if dangling:
        table, rowid, parent, _ = dangling[0]
        raise RuntimeError(
            f"migration left {len(dangling)} rows referencing missing rows "
            f"(first: {table} rowid {rowid} -> {parent})"
        )


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
