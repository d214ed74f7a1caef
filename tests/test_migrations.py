"""`alembic upgrade head` yields exactly the models' schema (no drift), on both databases."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlmodel import SQLModel

import fsm.models  # noqa: F401
from fsm import partitions
from fsm.migrate import alembic_config, upgrade
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
            conn, opts={"include_name": partitions.include_name, "compare_type": True}
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


def test_plain_alembic_cli_works(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/cli.db"
    alembic = Path(sys.executable).parent / "alembic"
    result = subprocess.run(
        [str(alembic), "upgrade", "head"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"ORDER_SAGA_DATABASE_URL": url, "PATH": "/usr/bin"},
    )
    assert result.returncode == 0, result.stderr
    engine = make_engine(url)
    with engine.connect() as conn:
        assert "orders" in inspect(conn).get_table_names()
        assert conn.execute(text("PRAGMA journal_mode")).scalar_one() == "wal"
    engine.dispose()
