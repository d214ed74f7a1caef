"""Shared fixtures: a database per test on SQLite *and* PostgreSQL, the reference services
on a real loopback port, and an executor wired to both. Nothing here is mocked."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import psycopg
import pytest
import uvicorn
from sqlalchemy import text
from sqlmodel import SQLModel

import fsm.models  # noqa: F401  (registers the tables)
from downstream.app import create_services_app
from fsm.clients import Services
from fsm.executor import Executor
from fsm.settings import Settings
from fsm.store import Store, make_engine
from fsm.wiring import build_executor, build_store, http_client, http_services_for

PG_SERVER = os.environ.get("ORDER_SAGA_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432")
# Retry budgets small enough for tests, still every branch of the policy.
FAST = {"max_attempts": 3, "backoff_base": 0.01, "backoff_max": 0.05, "step_deadline": 5}


def saga_settings(db_url: str, services_url: str | None = None, **overrides: Any) -> Settings:
    """The settings a test engine runs with: FAST retries, short HTTP timeout."""
    urls = {}
    if services_url is not None:
        urls = {
            f"{name}_url": services_url for name in ("product", "user", "inventory", "shipping")
        }
    return Settings(database_url=db_url, http_timeout=1.0, **{**FAST, **urls, **overrides})


def _pg_admin() -> psycopg.Connection[Any]:
    dsn = PG_SERVER.replace("postgresql+psycopg://", "postgresql://") + "/test"
    return psycopg.connect(dsn, autocommit=True)


def create_pg_database(name: str) -> str:
    with _pg_admin() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    return f"{PG_SERVER}/{name}"


def drop_pg_database(name: str) -> None:
    with _pg_admin() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


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


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/saga.db"
        engine = make_engine(url)
        SQLModel.metadata.create_all(engine)
    else:
        url = request.getfixturevalue("pg_url")
        engine = make_engine(url)
        with engine.begin() as conn:
            conn.execute(text("TRUNCATE transitions, orders"))
    engine.dispose()
    return url


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    store = build_store(saga_settings(db_url, lease_seconds=30))
    yield store
    store.close()
    store.engine.dispose()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class LiveServer:
    """An ASGI app served by uvicorn on 127.0.0.1 in a background thread."""

    def __init__(self, app: Any, *, lifespan: str = "off") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan=lifespan
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="session")
def services_server() -> Iterator[LiveServer]:
    app = create_services_app()
    with LiveServer(app) as server:
        yield server
    app.state.store.close()


@pytest.fixture
def services_url(services_server: LiveServer) -> str:
    """The reference services, freshly seeded, over real HTTP."""
    httpx.post(f"{services_server.url}/_reset").raise_for_status()
    return services_server.url


class Downstream:
    """Reads the reference services' state for assertions (balance, stock, shipments)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str) -> Any:
        return httpx.get(f"{self.url}{path}").json()

    def balance(self, user_id: int) -> int:
        return int(self.get(f"/users/{user_id}")["balance"])

    def stock(self, product_id: int) -> int:
        return int(self.get(f"/inventory/{product_id}")["quantity"])

    def shipment(self, order_id: object) -> dict[str, Any] | None:
        response = httpx.get(f"{self.url}/shipping/{order_id}")
        return None if response.status_code == 404 else dict(response.json())

    def effects(self) -> dict[str, int]:
        return dict(self.get("/_effects")["effects"])

    def fault(self, operation: str, mode: str, count: int = 1, seconds: float = 0.05) -> None:
        body = {"operation": operation, "mode": mode, "count": count, "seconds": seconds}
        httpx.post(f"{self.url}/_faults", json=body).raise_for_status()


@pytest.fixture
def downstream(services_url: str) -> Downstream:
    return Downstream(services_url)


@pytest.fixture
async def services(services_url: str) -> AsyncIterator[Services]:
    settings = saga_settings("sqlite://", services_url)
    async with http_client(settings) as client:
        yield http_services_for(settings, client)


@pytest.fixture
async def executor(db_url: str, store: Store, services: Services) -> AsyncIterator[Executor]:
    executor = build_executor(saga_settings(db_url), store=store, services=services)
    yield executor
    await executor.aclose()
