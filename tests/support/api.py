"""Driving the orchestrator's HTTP API in tests: the settings it runs with (API), an app
under TestClient (lifespan included), placing an order, waiting for it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from fastapi.testclient import TestClient

from api.app import create_app
from downstream.seed import (
    ORDINARY_USER_ID,
    PRODUCTS,
    WIDGET_ID,
)
from fsm.machine import TERMINAL_ORDER_STATES
from tests.support.services import Downstream, LiveServer
from tests.support.settings import saga_settings
from tests.support.waiting import wait_until

# What the seed (downstream/seed.py) sells the widget for, in cents.
WIDGET_PRICE = next(p.price for p in PRODUCTS if p.id == WIDGET_ID)
TOKEN = "s3cret"
# The API under test calls the services with room to spare and answers its POST within the
# run (tests of 202 lower respond_within themselves).
API: dict[str, Any] = {"http_timeout": 3.0, "respond_within": 5.0}
# The states an order ends in, as the machine declares them: needs_attention is not one (it
# waits for a retry or an operator), resolved is.
TERMINAL = frozenset(state.value for state in TERMINAL_ORDER_STATES)


@contextmanager
def api(db_url: str, services_url: str, **overrides: Any) -> Iterator[TestClient]:
    app = create_app(saga_settings(db_url, services_url, **(API | overrides)), sweep=False)
    with TestClient(app) as client:
        yield client


@contextmanager
def served_api(db_url: str, services_url: str, **overrides: Any) -> Iterator[str]:
    """The API (lifespan included) served on a loopback port, its URL: for a test whose
    request must fail on a timeout rather than hang when no answer comes."""
    app = create_app(saga_settings(db_url, services_url, **(API | overrides)), sweep=False)
    with LiveServer(app, lifespan="on") as server:
        yield server.url


LOGIN_TOKEN = re.compile(r'name="login_token" value="([^"]+)"')


def console_sign_in(
    client: TestClient, key: str, next_: str = "/ui", *, follow_redirects: bool = False
) -> Any:
    """POST /ui/login as the browser does: GET the form first (its pre-session cookie and
    the same token in a hidden field), then send it back with the key."""
    form = client.get("/ui/login", params={"next": next_})
    assert form.status_code == 200, form.text
    found = LOGIN_TOKEN.search(form.text)
    assert found is not None, form.text
    data = {"key": key, "next": next_, "login_token": found.group(1)}
    return client.post("/ui/login", data=data, follow_redirects=follow_redirects)


def place(
    client: TestClient,
    *,
    user: int = ORDINARY_USER_ID,
    product: int = WIDGET_ID,
    quantity: int = 1,
    headers: dict[str, str] | None = None,
) -> Any:
    body = {"user_id": user, "product_id": product, "quantity": quantity}
    return client.post("/orders", json=body, headers=headers or {})


def wait_terminal(client: TestClient, order_id: str, timeout: float = 10.0) -> dict[str, Any]:
    def terminal() -> dict[str, Any] | None:
        response = client.get(f"/orders/{order_id}")
        assert response.status_code == 200, response.text
        order: dict[str, Any] = response.json()
        return order if order["state"] in TERMINAL else None

    found: dict[str, Any] = wait_until(terminal, timeout, what=f"order {order_id} to end")
    return found


def assert_utc(stamp: str) -> None:
    parsed = datetime.fromisoformat(stamp)
    assert parsed.utcoffset() == timedelta(0), stamp


def assert_message(response: Any) -> None:
    """A 4xx with something a human can read: a string detail, or FastAPI's list of errors
    each carrying `msg`."""
    detail = response.json()["detail"]
    if isinstance(detail, str):
        assert detail
    else:
        assert detail and all(isinstance(e["msg"], str) and e["msg"] for e in detail)


def order_effects(downstream: Downstream, order_id: str) -> dict[str, int]:
    return {k: v for k, v in downstream.effects().items() if k.startswith(order_id)}
