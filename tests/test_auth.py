"""ORDER_SAGA_API_TOKEN (issue 11, items 1-4): every path of the app's own router table,
the mounted reference services included, needs the bearer token but the public ones
(/healthz, /metrics, the console's sign-in); the table is walked, not listed by hand, so a
route added later is covered. The token is the bootstrap admin of issue 17."""

from __future__ import annotations

import asyncio
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlmodel import SQLModel
from starlette.routing import BaseRoute, Mount

from api.access import public_paths
from api.app import create_app
from downstream.seed import ORDINARY_USER_ID, WIDGET_ID
from fsm.settings import Settings
from fsm.store import make_engine
from fsm.wiring import open_store
from tests.support.processes import ORDER_SAGA, run_cli
from tests.support.services import LiveServer, free_port
from tests.support.settings import cli_settings, saga_env

TOKEN = "s3cret-token"
NON_ASCII_TOKEN = "sécret-ключ-令牌"
OPEN_PATHS = public_paths()
PARAM = re.compile(r"{([^}:]+)(?::[^}]+)?}")
ORDER_ID = str(uuid.uuid4())

WRONG = [
    pytest.param({}, id="no-header"),
    pytest.param({"Authorization": "Bearer nope"}, id="wrong-token"),
    pytest.param({"Authorization": f"Bearer {TOKEN[:-1]}"}, id="token-prefix"),
    pytest.param({"Authorization": f"Basic {TOKEN}"}, id="basic-scheme"),
    pytest.param({"Authorization": TOKEN}, id="bare-token"),
    pytest.param({"Authorization": "Bearer "}, id="empty-bearer"),
    pytest.param({"Authorization": "Bearer sécret".encode()}, id="non-ASCII"),
    pytest.param({"Authorization": b"Bearer \xe9\xff"}, id="latin-1-bytes"),
]


def concrete(path: str) -> str:
    return PARAM.sub(lambda m: ORDER_ID if "order" in m.group(1) else "1", path)


def walk(routes: list[BaseRoute], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(method, path) of every endpoint, through included routers and mounted apps."""
    for route in iter_route_contexts(routes):
        if isinstance(route.original_route, Mount):
            yield from walk(list(route.original_route.routes), prefix + str(route.path))
            continue
        for method in sorted(route.methods or {"GET"}):
            yield method, prefix + concrete(str(route.path))


def app_with_token(tmp_path: Path, token: str) -> FastAPI:
    url = f"sqlite:///{tmp_path}/auth.db"
    engine = make_engine(url)
    SQLModel.metadata.create_all(engine)
    engine.dispose()
    # No downstream URLs: the reference services are mounted under /services.
    settings = cli_settings(url, services_db=str(tmp_path / "s.db"), api_token=token)
    return create_app(settings, sweep=False)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    app = app_with_token(tmp_path_factory.mktemp("auth"), TOKEN)
    with TestClient(app) as client:
        yield client


def endpoints(client: TestClient) -> list[tuple[str, str]]:
    app: FastAPI = client.app  # type: ignore[assignment]
    found = sorted(set(walk(app.routes)))
    assert any(path.startswith("/services/") for _, path in found)  # the mount is walked
    return found


@pytest.mark.parametrize("headers", WRONG)
def test_every_path_but_health_and_metrics_needs_the_token(
    secured: TestClient, headers: dict[str, Any]
) -> None:
    found = endpoints(secured)
    assert len(found) > 20
    before = secured.get("/services/_effects", headers={"Authorization": f"Bearer {TOKEN}"})
    # One check over the router table, walked at run time: the message names the route.
    for method, path in found:
        route = f"{method} {path}"
        response = secured.request(method, path, headers=headers)
        if path in OPEN_PATHS:  # the gate lets it through (POST /ui/login may say "wrong key"
            # or, without the form's token, answer its own 403 page: never the gate's refusal)
            assert "WWW-Authenticate" not in response.headers, route
            gate = response.headers.get("content-type") == "application/problem+json"
            assert not (response.status_code == 403 and gate), route
            continue
        assert response.status_code == 401, (route, response.text)
        assert response.headers["WWW-Authenticate"] == "Bearer", route
        assert response.headers["content-type"] == "application/problem+json", route
        if method != "HEAD":
            assert response.json()["detail"] == "missing or wrong bearer token", route
    # /services/_reset, /_faults, /users/refund ... all refused: nothing changed.
    after = secured.get("/services/_effects", headers={"Authorization": f"Bearer {TOKEN}"})
    assert after.json() == before.json()
    ok = secured.get("/orders", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.json()["orders"] == []


GATE_CODES = ("unauthorized", "forbidden")


def test_the_right_token_opens_every_path(secured: TestClient) -> None:
    for method, path in endpoints(secured):
        if method == "POST" and path.endswith("/_reset"):
            continue  # would wipe the services other tests in this module read
        if path in OPEN_PATHS:
            continue  # needs no token: the console's sign-in judges its own form
        response = secured.request(method, path, headers={"Authorization": f"Bearer {TOKEN}"})
        # The gate let it through: a 401 of the route's own (the webhook sink refusing an
        # unsigned event) is not the gate's `unauthorized`/`forbidden` problem.
        refused = response.status_code in (401, 403) and response.headers.get(
            "content-type", ""
        ).startswith("application/problem+json")
        assert not refused or response.json().get("code") not in GATE_CODES, f"{method} {path}"
        assert response.status_code < 500, (f"{method} {path}", response.text)


def test_a_route_added_later_is_covered(tmp_path: Path) -> None:
    app = app_with_token(tmp_path, TOKEN)

    @app.get("/added-later")
    def added() -> dict[str, str]:
        return {"secret": "yes"}

    with TestClient(app) as client:
        assert client.get("/added-later").status_code == 401
        good = client.get("/added-later", headers={"Authorization": f"Bearer {TOKEN}"})
        assert good.json() == {"secret": "yes"}


@pytest.fixture(scope="module")
def non_ascii_secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    app = app_with_token(tmp_path_factory.mktemp("non-ascii"), NON_ASCII_TOKEN)
    with TestClient(app) as client:
        yield client


def test_a_non_ascii_configured_token_works(non_ascii_secured: TestClient) -> None:
    right = {"Authorization": b"Bearer " + NON_ASCII_TOKEN.encode()}
    assert non_ascii_secured.get("/orders", headers=right).status_code == 200
    other_encoding = {"Authorization": b"Bearer " + NON_ASCII_TOKEN.encode("utf-16")}
    assert non_ascii_secured.get("/orders", headers=other_encoding).status_code == 401


@pytest.mark.parametrize("headers", WRONG)
def test_a_non_ascii_configured_token_refuses_wrong_auth_and_never_500s(
    non_ascii_secured: TestClient, headers: dict[str, Any]
) -> None:
    assert non_ascii_secured.get("/orders", headers=headers).status_code == 401


def test_openapi_declares_the_bearer_scheme(secured: TestClient) -> None:
    document = secured.get("/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    bearer = document["components"]["securitySchemes"]["bearer"]
    assert (bearer["type"], bearer["scheme"]) == ("http", "bearer")
    # One check over every operation the document lists: the message names the operation.
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            expected = [] if path in OPEN_PATHS else [{"bearer": []}, {"session": []}]
            assert operation.get("security", []) == expected, f"{method.upper()} {path}"
            if path not in OPEN_PATHS:
                assert "401" in operation["responses"], f"{method.upper()} {path}"


@pytest.mark.parametrize("token", ["", " ", "\t\n", " padded ", "new\nline"])
def test_an_unusable_token_is_refused_at_start_up(token: str) -> None:
    with pytest.raises(ValidationError, match="api_token"):
        Settings(api_token=token)


def test_the_cli_refuses_an_empty_token_in_one_line() -> None:
    result = run_cli("serve", "--port", "1", ORDER_SAGA_API_TOKEN="")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "order-saga: invalid ORDER_SAGA_API_TOKEN: "
        "Value error, must not be empty (unset it to turn authentication off)"
    ]


def test_no_token_configured_leaves_every_path_open(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/open.db"
    engine = make_engine(url)
    SQLModel.metadata.create_all(engine)
    engine.dispose()
    app = create_app(cli_settings(url, services_db=str(tmp_path / "s.db")), sweep=False)
    with TestClient(app) as client:
        assert client.get("/orders").status_code == 200
        assert client.get(f"/services/users/{ORDINARY_USER_ID}").status_code == 200
        assert client.get("/ui").status_code == 200


@pytest.mark.parametrize("token", [TOKEN, NON_ASCII_TOKEN], ids=["ascii", "non-ASCII"])
def test_embedded_services_are_called_with_the_token(tmp_path: Path, token: str) -> None:
    """`serve` with a token calls its own mounted services with it (and `resume`, through
    the fallback URL, too): the saga still completes."""
    url = f"sqlite:///{tmp_path}/live.db"
    engine = make_engine(url)
    SQLModel.metadata.create_all(engine)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    settings = cli_settings(url, services_db=str(tmp_path / "s.db"), api_token=token)
    app = create_app(settings, embedded_url=f"{base}/services", sweep=False)
    server = LiveServer(app, port=port, lifespan="auto").start()
    try:
        auth = {"Authorization": b"Bearer " + token.encode()}
        body = {"user_id": ORDINARY_USER_ID, "product_id": WIDGET_ID, "quantity": 1}
        placed = httpx.post(f"{base}/orders", json=body, headers=auth, timeout=30)
        assert placed.status_code == 201, placed.text
        assert placed.json()["status"] == "completed"

        with open_store(settings) as store:
            stuck, _ = asyncio.run(
                store.create_order(user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1)
            )
        env = saga_env(database_url=url)
        env |= {
            "ORDER_SAGA_API_TOKEN": token,
            "ORDER_SAGA_FALLBACK_SERVICES_URL": f"{base}/services",
        }
        resumed = subprocess.run(
            [ORDER_SAGA, "resume", "--order", str(stuck.id)],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert resumed.returncode == 0, resumed.stderr
        with open_store(settings) as store:
            assert store.get(stuck.id).status == "completed"
    finally:
        server.stop()
        engine.dispose()
