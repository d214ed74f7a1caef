"""The API under test: on the `db_url` database (SQLite and PostgreSQL), on one shared
SQLite app for requests refused before storage, and with a bearer token configured."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlmodel import SQLModel

from fsm.store import make_engine
from tests.support.api import (
    TOKEN,
    api,
)
from tests.support.services import LiveServer


@pytest.fixture
def client(db_url: str, services_url: str) -> Iterator[TestClient]:
    with api(db_url, services_url) as c:
        yield c


@pytest.fixture(scope="module")
def sqlite_client(
    tmp_path_factory: pytest.TempPathFactory, services_server: LiveServer
) -> Iterator[TestClient]:
    """For requests rejected before they reach storage or any service: one app on one
    database serves them all (each such test also checks that nothing was stored)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('validation')}/saga.db"
    engine = make_engine(url)
    SQLModel.metadata.create_all(engine)
    engine.dispose()
    with api(url, services_server.url) as c:
        yield c


@pytest.fixture
def secured(db_url: str, services_url: str) -> Iterator[TestClient]:
    with api(db_url, services_url, api_token=TOKEN) as c:
        yield c
