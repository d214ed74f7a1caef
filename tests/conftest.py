"""Shared fixtures (their helpers live in tests/support/): a database per test on SQLite
*and* PostgreSQL, the reference services on a real loopback port, and an executor wired
to both. Nothing here is mocked."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlmodel import SQLModel

import fsm.models  # noqa: F401  (registers the tables)
from downstream.app import create_services_app
from fsm.clients import Services
from fsm.executor import Executor
from fsm.store import Store, make_engine
from fsm.wiring import http_client, http_services_for, open_saga, open_store
from order_saga import logs
from tests.support.database import create_pg_database, drop_pg_database
from tests.support.services import HTTP, Downstream, LiveServer
from tests.support.settings import saga_settings


@pytest.fixture(autouse=True)
def _root_logger_restored() -> Iterator[None]:
    """A command run in-process (CliRunner) points logging at its own stderr, which is
    closed when the command returns: its lines are written, then the root logger is put
    back, so later tests on this worker do not log into a closed stream."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    if root.handlers != handlers:
        logs.flush()
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.fixture(scope="session")
def pg_url(worker_id: str) -> Iterator[str]:
    """One PostgreSQL database per xdist worker, schema created once, emptied per test."""
    name = f"order_saga_test_{worker_id}_{os.getpid()}"  # concurrent runs never collide
    url = create_pg_database(name)
    engine = make_engine(url)
    SQLModel.metadata.create_all(engine)
    engine.dispose()
    yield url
    drop_pg_database(name)


@pytest.fixture(scope="session")
def sqlite_schema(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite database with the schema, made once per xdist worker: each test gets a copy
    (0.1 ms; `create_all`, a dozen DDL commits, took 40-150 ms a test)."""
    path = tmp_path_factory.mktemp("schema") / "saga.db"
    engine = make_engine(f"sqlite:///{path}")
    SQLModel.metadata.create_all(engine)
    engine.dispose()  # the last connection gone: the file alone holds the database
    return path


# What a test leaves behind on PostgreSQL, emptied before the next. DELETE, not TRUNCATE: a
# TRUNCATE makes new files for every table, index and partition of the log and took
# 160-330 ms a test; these tables hold a few rows (none references another).
EMPTIED = (
    "transitions",
    "orders",
    "api_keys",
    "ended_sessions",
    "outbox_deliveries",
    "outbox_cursors",
    "outbox_events",
    "event_destinations",
    "heat_totals",
    "heat_hours",
    "heat_cursor",
)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        shutil.copyfile(request.getfixturevalue("sqlite_schema"), tmp_path / "saga.db")
        return f"sqlite:///{tmp_path}/saga.db"
    url: str = request.getfixturevalue("pg_url")
    engine = make_engine(url)
    with engine.begin() as conn:
        for table in EMPTIED:
            conn.execute(text(f"DELETE FROM {table}"))
        # A test that ran `serve` or `db upgrade` here stamped a revision; the next one
        # starts, as every test does, from the schema made without Alembic.
        conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
    engine.dispose()
    return url


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    with open_store(saga_settings(db_url, lease_seconds=30)) as store:
        yield store


@pytest.fixture(scope="session")
def services_server() -> Iterator[LiveServer]:
    app = create_services_app()
    with LiveServer(app) as server:
        yield server
    app.state.store.close()


@pytest.fixture
def services_url(services_server: LiveServer) -> str:
    """The reference services, freshly seeded, over real HTTP."""
    HTTP.post(f"{services_server.url}/_reset").raise_for_status()
    return services_server.url


@pytest.fixture
def downstream(services_url: str) -> Downstream:
    return Downstream(services_url)


@pytest.fixture
async def services(services_url: str) -> AsyncIterator[Services]:
    settings = saga_settings("sqlite:///unused.db", services_url)  # clients only: no database
    async with http_client(settings) as client:
        yield http_services_for(settings, client)


@pytest.fixture
async def executor(db_url: str, store: Store, services: Services) -> AsyncIterator[Executor]:
    """The engine as `open_saga` builds it, driving through the `store` fixture."""
    async with open_saga(saga_settings(db_url), store=store, services=services) as saga:
        yield saga.executor
