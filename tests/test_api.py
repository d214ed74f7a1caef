"""SPEC §4, the HTTP contract of the orchestrator: every endpoint's success and error codes,
through `create_app()` (lifespan included) against the reference services over real HTTP,
on SQLite and PostgreSQL wherever the endpoint touches storage."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import SQLModel

from api.app import create_app
from downstream.seed import (
    MISSING_PRODUCT_ID,
    ORDINARY_USER_ID,
    POOR_USER_ID,
    RICH_USER_ID,
    WIDGET_ID,
)
from fsm.settings import Settings
from fsm.store import Store, make_engine
from tests.support.services import Downstream, LiveServer

# The seed's named ids (downstream/seed.py); the widget costs 1999 cents.
WIDGET_PRICE = 1999
TOKEN = "s3cret"
TERMINAL = {"completed", "failed", "rejected", "cancelled", "needs_attention"}


def settings_for(db_url: str, services_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": db_url,
        "product_url": services_url,
        "user_url": services_url,
        "inventory_url": services_url,
        "shipping_url": services_url,
        "http_timeout": 3.0,
        "max_attempts": 3,
        "backoff_base": 0.01,
        "backoff_max": 0.05,
        "step_deadline": 5.0,
        "respond_within": 5.0,
        **overrides,
    }
    return Settings(**values)


@contextmanager
def api(db_url: str, services_url: str, **overrides: Any) -> Iterator[TestClient]:
    app = create_app(settings_for(db_url, services_url, **overrides), sweep=False)
    with TestClient(app) as client:
        yield client


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
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(f"/orders/{order_id}")
        assert response.status_code == 200, response.text
        order: dict[str, Any] = response.json()
        if order["status"] in TERMINAL:
            return order
        if time.monotonic() > deadline:
            raise AssertionError(f"order {order_id} still {order['state']} after {timeout}s")
        time.sleep(0.05)


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


# -- POST /orders ------------------------------------------------------------------------


def test_create_completed(client: TestClient, downstream: Downstream) -> None:
    balance, stock = downstream.balance(ORDINARY_USER_ID), downstream.stock(WIDGET_ID)

    response = place(client, quantity=2)

    assert response.status_code == 201, response.text
    order = response.json()
    uuid.UUID(order["id"])
    assert (order["user_id"], order["product_id"], order["quantity"]) == (
        ORDINARY_USER_ID,
        WIDGET_ID,
        2,
    )
    assert order["amount"] == 2 * WIDGET_PRICE and type(order["amount"]) is int
    assert (order["status"], order["state"]) == ("completed", "completed")
    assert order["steps"] == {
        "payment": "succeeded",
        "inventory": "succeeded",
        "shipping": "succeeded",
    }
    assert order["shipping"]["address"] and order["shipping"]["expected_delivery"]
    assert order["last_error"] is None and order["attention_reason"] is None
    assert_utc(order["created_at"])
    assert_utc(order["updated_at"])
    assert downstream.balance(ORDINARY_USER_ID) == balance - 2 * WIDGET_PRICE
    assert downstream.stock(WIDGET_ID) == stock - 2
    shipment = downstream.shipment(order["id"])
    assert shipment is not None and shipment["status"] == "scheduled"


def test_create_failed_answers_201(client: TestClient, downstream: Downstream) -> None:
    balance, stock = downstream.balance(POOR_USER_ID), downstream.stock(WIDGET_ID)

    response = place(client, user=POOR_USER_ID)

    assert response.status_code == 201, response.text
    order = response.json()
    assert (order["status"], order["state"]) == ("failed", "failed")
    assert order["steps"]["payment"] == "failed"
    assert order["steps"]["inventory"] == order["steps"]["shipping"] == "compensated"
    assert order["amount"] == WIDGET_PRICE
    assert order["shipping"] is None
    assert downstream.balance(POOR_USER_ID) == balance
    assert downstream.stock(WIDGET_ID) == stock


def test_missing_product_404_names_the_order(client: TestClient, downstream: Downstream) -> None:
    response = place(client, product=MISSING_PRODUCT_ID)

    assert response.status_code == 404, response.text
    body = response.json()
    assert str(MISSING_PRODUCT_ID) in body["detail"]
    order_id = body["id"]
    assert body["status"] == "rejected" and body["amount"] is None
    shown = client.get(f"/orders/{order_id}")
    assert shown.status_code == 200
    assert (shown.json()["status"], shown.json()["state"]) == ("rejected", "rejected")
    assert order_effects(downstream, order_id) == {}  # nothing else was called


def test_prefer_respond_async_answers_202_then_completes(client: TestClient) -> None:
    response = place(client, headers={"Prefer": "respond-async"})

    assert response.status_code == 202, response.text
    order = response.json()
    assert response.headers["Location"] == f"/orders/{order['id']}"
    assert order["status"] not in TERMINAL
    final = wait_terminal(client, order["id"])
    assert final["status"] == "completed"
    assert final["amount"] == WIDGET_PRICE


def test_slow_services_answer_202_then_complete(
    db_url: str, services_url: str, downstream: Downstream
) -> None:
    downstream.fault("shipping.schedule", "delay", count=1, seconds=1.0)
    with api(db_url, services_url, respond_within=0.2) as client:
        response = place(client)
        assert response.status_code == 202, response.text
        order = response.json()
        # answered before shipping did: no shipment exists yet for the order just answered
        assert downstream.shipment(order["id"]) is None
        assert response.headers["Location"] == f"/orders/{order['id']}"
        assert order["status"] in {"pending", "running"}
        assert client.get(response.headers["Location"]).status_code == 200
        final = wait_terminal(client, order["id"])
    assert final["status"] == "completed"
    assert final["shipping"]["address"]


BAD_BODIES = {
    "missing field": {"user_id": 1, "product_id": 1},
    "string user id": {"user_id": "1", "product_id": 1, "quantity": 1},
    "string product id": {"user_id": 1, "product_id": "1", "quantity": 1},
    "float quantity": {"user_id": 1, "product_id": 1, "quantity": 1.5},
    "integral float": {"user_id": 1, "product_id": 1, "quantity": 1.0},
    "bool quantity": {"user_id": 1, "product_id": 1, "quantity": True},
    "zero quantity": {"user_id": 1, "product_id": 1, "quantity": 0},
    "negative quantity": {"user_id": 1, "product_id": 1, "quantity": -3},
    "zero user id": {"user_id": 0, "product_id": 1, "quantity": 1},
    "null product": {"user_id": 1, "product_id": None, "quantity": 1},
    "extra field": {"user_id": 1, "product_id": 1, "quantity": 1, "coupon": "FREE"},
    "not an object": [1, 1, 1],
}


@pytest.mark.parametrize("body", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_create_rejects_bad_input(sqlite_client: TestClient, body: Any) -> None:
    response = sqlite_client.post("/orders", json=body)

    assert response.status_code == 422, response.text
    assert_message(response)
    assert sqlite_client.get("/orders").json()["orders"] == []  # nothing stored, so no call


@pytest.mark.parametrize("content", ["not json", '{"user_id": 1,', ""])
def test_create_rejects_non_json(sqlite_client: TestClient, content: str) -> None:
    response = sqlite_client.post(
        "/orders", content=content, headers={"Content-Type": "application/json"}
    )

    assert response.status_code == 422, response.text
    assert_message(response)
    assert sqlite_client.get("/orders").json()["orders"] == []


def test_create_rejects_overlong_idempotency_key(sqlite_client: TestClient) -> None:
    response = place(sqlite_client, headers={"Idempotency-Key": "k" * 201})

    assert response.status_code == 422, response.text
    assert_message(response)
    assert sqlite_client.get("/orders").json()["orders"] == []


def test_idempotency_key_retry_returns_same_order_and_charges_once(
    client: TestClient, downstream: Downstream
) -> None:
    balance = downstream.balance(ORDINARY_USER_ID)
    key = {"Idempotency-Key": f"checkout-{uuid.uuid4()}"}

    first = place(client, headers=key)
    again = place(client, headers=key)

    assert first.status_code == again.status_code == 201, (first.text, again.text)
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["status"] == "completed"
    order_id = first.json()["id"]
    assert downstream.balance(ORDINARY_USER_ID) == balance - WIDGET_PRICE
    assert order_effects(downstream, order_id) == {
        f"{order_id}:payment:deduct": 1,
        f"{order_id}:inventory:deduct": 1,
        f"{order_id}:shipping:schedule": 1,
    }
    assert len(client.get("/orders").json()["orders"]) == 1


def test_idempotency_key_reused_for_another_body_is_422(
    client: TestClient, downstream: Downstream
) -> None:
    key = {"Idempotency-Key": "reused-key"}
    first = place(client, quantity=1, headers=key)
    assert first.status_code == 201
    balance = downstream.balance(ORDINARY_USER_ID)

    other = place(client, quantity=2, headers=key)

    assert other.status_code == 422, other.text
    [error] = other.json()["errors"]  # the same problem shape as every other 422
    assert error["loc"] == ["header", "Idempotency-Key"]
    assert "already used for a different order" in error["msg"]
    assert downstream.balance(ORDINARY_USER_ID) == balance
    assert [o["id"] for o in client.get("/orders").json()["orders"]] == [first.json()["id"]]


def test_idempotency_key_retry_while_the_first_is_still_running(
    client: TestClient, downstream: Downstream
) -> None:
    downstream.fault("shipping.schedule", "delay", count=1, seconds=0.5)
    key = {"Idempotency-Key": f"in-flight-{uuid.uuid4()}"}

    first = place(client, headers={**key, "Prefer": "respond-async"})
    again = place(client, headers=key)

    assert first.status_code == 202, first.text
    assert again.status_code in (201, 202), again.text
    order_id = first.json()["id"]
    assert again.json()["id"] == order_id
    assert wait_terminal(client, order_id)["status"] == "completed"
    assert set(order_effects(downstream, order_id).values()) == {1}
    assert len(client.get("/orders").json()["orders"]) == 1


def test_idempotency_key_retry_of_a_rejected_order_is_404_again(client: TestClient) -> None:
    key = {"Idempotency-Key": "missing-product"}

    first = place(client, product=MISSING_PRODUCT_ID, headers=key)
    again = place(client, product=MISSING_PRODUCT_ID, headers=key)

    assert first.status_code == again.status_code == 404
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["status"] == "rejected"


# -- GET /orders/{id} --------------------------------------------------------------------


def test_get_order(client: TestClient) -> None:
    created = place(client, user=RICH_USER_ID, quantity=3).json()

    response = client.get(f"/orders/{created['id']}")

    assert response.status_code == 200
    order = response.json()
    assert order["id"] == created["id"]
    assert (order["user_id"], order["product_id"], order["quantity"]) == (
        RICH_USER_ID,
        WIDGET_ID,
        3,
    )
    assert order["amount"] == 3 * WIDGET_PRICE
    assert order["status"] == order["state"] == "completed"
    assert order["shipping"] == created["shipping"]
    assert order["created_at"] == created["created_at"]
    assert_utc(order["created_at"])
    assert_utc(order["updated_at"])


def test_get_unknown_order_is_404(client: TestClient) -> None:
    unknown = uuid.uuid4()
    response = client.get(f"/orders/{unknown}")

    assert response.status_code == 404
    assert str(unknown) in response.json()["detail"]


def test_get_malformed_order_id_is_422(sqlite_client: TestClient) -> None:
    response = sqlite_client.get("/orders/not-a-uuid")

    assert response.status_code == 422
    assert_message(response)


# -- GET /orders -------------------------------------------------------------------------


def test_list_newest_first_filtered_and_paginated(client: TestClient) -> None:
    ids = [
        place(client).json()["id"],  # completed
        place(client, user=POOR_USER_ID).json()["id"],  # failed
        place(client, product=MISSING_PRODUCT_ID).json()["id"],  # rejected
        place(client, user=RICH_USER_ID).json()["id"],  # completed
    ]
    newest_first = ids[::-1]

    everything = client.get("/orders")
    assert everything.status_code == 200
    assert [o["id"] for o in everything.json()["orders"]] == newest_first

    completed = client.get("/orders", params={"status": "completed"}).json()["orders"]
    assert [o["id"] for o in completed] == [ids[3], ids[0]]
    assert {o["status"] for o in completed} == {"completed"}
    failed = client.get("/orders", params={"status": "failed"}).json()["orders"]
    assert [o["id"] for o in failed] == [ids[1]]
    assert client.get("/orders", params={"status": "cancelled"}).json()["orders"] == []

    page1 = client.get("/orders", params={"limit": 2}).json()
    page2 = client.get("/orders", params={"limit": 2, "offset": 2}).json()
    page3 = client.get("/orders", params={"limit": 2, "offset": 4}).json()
    assert (page1["limit"], page1["offset"], page2["offset"]) == (2, 0, 2)
    assert [o["id"] for o in page1["orders"] + page2["orders"]] == newest_first
    assert page3["orders"] == []


@pytest.mark.parametrize(
    "params",
    [
        {"status": "bogus"},
        {"limit": 0},
        {"limit": 501},
        {"limit": "ten"},
        {"offset": -1},
        {"offset": 10**20},
    ],
    ids=[
        "unknown status",
        "limit 0",
        "limit too big",
        "limit not int",
        "negative offset",
        "offset overflows",
    ],
)
def test_list_rejects_bad_query(sqlite_client: TestClient, params: dict[str, Any]) -> None:
    response = sqlite_client.get("/orders", params=params)

    assert response.status_code == 422, response.text
    assert_message(response)


# -- GET /orders/{id}/transitions --------------------------------------------------------


def test_transitions_are_the_persisted_history(client: TestClient) -> None:
    order_id = place(client).json()["id"]

    response = client.get(f"/orders/{order_id}/transitions")

    assert response.status_code == 200
    log = response.json()
    assert [t["seq"] for t in log] == list(range(1, len(log) + 1))
    for t in log:
        assert {
            "seq",
            "scope",
            "trigger",
            "from_state",
            "to_state",
            "detail",
            "created_at",
        } <= t.keys()
        assert t["scope"] in {"order", "payment", "inventory", "shipping"}
        assert_utc(t["created_at"])
    first, last = log[0], log[-1]
    assert (first["scope"], first["trigger"], first["from_state"]) == (
        "order",
        "request_product",
        "pending",
    )
    assert (last["scope"], last["trigger"], last["to_state"]) == (
        "order",
        "all_succeeded",
        "completed",
    )
    found = next(t for t in log if t["trigger"] == "product_found")
    assert found["detail"]["product"]["price"] == WIDGET_PRICE  # the service's answer
    # per scope, each state continues from the previous one
    current: dict[str, str] = {}
    for t in log:
        if t["scope"] in current:
            assert t["from_state"] == current[t["scope"]]
        current[t["scope"]] = t["to_state"]
    stamps = [datetime.fromisoformat(t["created_at"]) for t in log]
    assert stamps == sorted(stamps)


def test_transitions_of_failed_step_carry_the_error(client: TestClient) -> None:
    order_id = place(client, user=POOR_USER_ID).json()["id"]

    log = client.get(f"/orders/{order_id}/transitions").json()

    fail = next(t for t in log if t["scope"] == "payment" and t["trigger"] == "fail")
    assert fail["detail"]["status"] == 402


def test_transitions_of_unknown_order_is_404(client: TestClient) -> None:
    response = client.get(f"/orders/{uuid.uuid4()}/transitions")

    assert response.status_code == 404
    assert_message(response)


# -- POST /orders/{id}/cancel ------------------------------------------------------------


def test_cancel_completed_order(client: TestClient, downstream: Downstream) -> None:
    balance, stock = downstream.balance(ORDINARY_USER_ID), downstream.stock(WIDGET_ID)
    order_id = place(client, quantity=2).json()["id"]
    assert downstream.balance(ORDINARY_USER_ID) == balance - 2 * WIDGET_PRICE

    response = client.post(f"/orders/{order_id}/cancel")

    assert response.status_code == 200, response.text
    order = response.json()
    assert (order["status"], order["state"]) == ("cancelled", "cancelled")
    assert set(order["steps"].values()) == {"compensated"}
    assert order["shipping"] is None
    assert downstream.balance(ORDINARY_USER_ID) == balance
    assert downstream.stock(WIDGET_ID) == stock
    shipment = downstream.shipment(order_id)
    assert shipment is not None and shipment["status"] == "cancelled"
    assert client.get(f"/orders/{order_id}").json()["status"] == "cancelled"
    triggers = [
        t["trigger"]
        for t in client.get(f"/orders/{order_id}/transitions").json()
        if t["scope"] == "order"
    ]
    assert triggers[-2:] == ["cancel", "cancellation_done"]


def test_cancel_failed_order_is_409(client: TestClient, downstream: Downstream) -> None:
    order_id = place(client, user=POOR_USER_ID).json()["id"]
    before = client.get(f"/orders/{order_id}/transitions").json()

    response = client.post(f"/orders/{order_id}/cancel")

    assert response.status_code == 409, response.text
    assert_message(response)
    assert client.get(f"/orders/{order_id}").json()["status"] == "failed"
    assert client.get(f"/orders/{order_id}/transitions").json() == before


def test_cancel_of_a_cancelled_order_is_idempotent(
    client: TestClient, downstream: Downstream
) -> None:
    order_id = place(client).json()["id"]
    assert client.post(f"/orders/{order_id}/cancel").status_code == 200
    before = client.get(f"/orders/{order_id}/transitions").json()
    effects = downstream.effects()

    response = client.post(f"/orders/{order_id}/cancel")

    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"
    assert client.get(f"/orders/{order_id}/transitions").json() == before
    assert downstream.effects() == effects  # refunded once, restored once


def test_cancel_unknown_order_is_404(client: TestClient) -> None:
    response = client.post(f"/orders/{uuid.uuid4()}/cancel")

    assert response.status_code == 404
    assert_message(response)


# -- POST /orders/{id}/resume ------------------------------------------------------------


def test_resume_terminal_order_is_a_noop(client: TestClient, downstream: Downstream) -> None:
    for kind, user, product in [
        ("completed", ORDINARY_USER_ID, WIDGET_ID),
        ("failed", POOR_USER_ID, WIDGET_ID),
        ("rejected", ORDINARY_USER_ID, MISSING_PRODUCT_ID),
    ]:
        created = place(client, user=user, product=product).json()
        before = client.get(f"/orders/{created['id']}/transitions").json()
        effects = downstream.effects()

        response = client.post(f"/orders/{created['id']}/resume")

        assert response.status_code == 200, response.text
        assert response.json()["status"] == kind
        assert response.json()["updated_at"] == created["updated_at"]
        assert client.get(f"/orders/{created['id']}/transitions").json() == before
        assert downstream.effects() == effects


async def test_resume_drives_a_stuck_order_to_completion(
    client: TestClient, store: Store, downstream: Downstream
) -> None:
    balance = downstream.balance(ORDINARY_USER_ID)
    stuck, created = await store.create_order(
        user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1
    )  # pending, nobody's lease
    assert created and stuck.lease_owner is None
    assert client.get(f"/orders/{stuck.id}").json()["status"] == "pending"

    response = client.post(f"/orders/{stuck.id}/resume")

    assert response.status_code == 200, response.text
    order = response.json()
    assert (order["status"], order["amount"]) == ("completed", WIDGET_PRICE)
    log = client.get(f"/orders/{stuck.id}/transitions").json()
    assert log[0]["from_state"] == "pending" and log[-1]["to_state"] == "completed"
    assert downstream.balance(ORDINARY_USER_ID) == balance - WIDGET_PRICE


async def test_resume_of_an_order_another_driver_holds_is_409(
    client: TestClient, store: Store, downstream: Downstream
) -> None:
    held, _ = await store.create_order(
        user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1, owner="another-worker"
    )

    response = client.post(f"/orders/{held.id}/resume")

    assert response.status_code == 409, response.text
    assert response.json()["code"] == "lease_lost"
    assert client.get(f"/orders/{held.id}").json()["status"] == "pending"
    assert client.get(f"/orders/{held.id}/transitions").json() == []
    assert order_effects(downstream, str(held.id)) == {}


# BUG (fsm/executor.py + fsm/store.py): the API drives background runs and /cancel, /resume
# with one Executor, hence one lease owner, and Store.claim() lets an owner re-take its own
# lease. So a cancel or resume of an order whose run is still in flight claims it too: resume
# drives it a second time concurrently (answering 200 or 409 stale_order, by luck); cancel
# answers 409 but releases the run's lease, the run dies with LeaseLost and the order is
# stranded in steps_running until a sweep picks it up.
def test_cancel_while_running_is_409_and_the_run_goes_on(
    client: TestClient, downstream: Downstream
) -> None:
    downstream.fault("shipping.schedule", "delay", count=1, seconds=0.5)
    order_id = place(client, headers={"Prefer": "respond-async"}).json()["id"]

    response = client.post(f"/orders/{order_id}/cancel")  # its run holds the lease

    assert response.status_code == 409, response.text
    assert wait_terminal(client, order_id, timeout=3)["status"] == "completed"


def test_resume_while_running_is_409_lease_held(client: TestClient, downstream: Downstream) -> None:
    downstream.fault("shipping.schedule", "delay", count=1, seconds=0.5)
    order_id = place(client, headers={"Prefer": "respond-async"}).json()["id"]

    response = client.post(f"/orders/{order_id}/resume")  # its run holds the lease

    assert response.status_code == 409, response.text
    assert response.json()["code"] == "lease_lost"  # not a second driver racing the first
    assert wait_terminal(client, order_id, timeout=3)["status"] == "completed"


def test_resume_unknown_order_is_404(client: TestClient) -> None:
    response = client.post(f"/orders/{uuid.uuid4()}/resume")

    assert response.status_code == 404
    assert_message(response)


# -- Authorization: Bearer (ORDER_SAGA_API_TOKEN) ----------------------------------------


@pytest.fixture
def secured(db_url: str, services_url: str) -> Iterator[TestClient]:
    with api(db_url, services_url, api_token=TOKEN) as c:
        yield c


WRONG_AUTH = {
    "no header": {},
    "wrong token": {"Authorization": "Bearer nope"},
    "token prefix": {"Authorization": f"Bearer {TOKEN[:-1]}"},
    "basic scheme": {"Authorization": f"Basic {TOKEN}"},
    "bare token": {"Authorization": TOKEN},
}
GOOD_AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_mutations_need_the_token(secured: TestClient, downstream: Downstream) -> None:
    order_id = place(secured, headers=GOOD_AUTH).json()["id"]
    effects = downstream.effects()

    for case, headers in WRONG_AUTH.items():
        answers = [
            place(secured, headers=headers),
            secured.post(f"/orders/{order_id}/cancel", headers=headers),
            secured.post(f"/orders/{order_id}/resume", headers=headers),
        ]
        for response in answers:
            assert response.status_code == 401, (case, response.text)
            assert response.headers["WWW-Authenticate"] == "Bearer"
            assert_message(response)
    assert len(secured.get("/orders", headers=GOOD_AUTH).json()["orders"]) == 1
    assert secured.get(f"/orders/{order_id}", headers=GOOD_AUTH).json()["status"] == "completed"
    assert downstream.effects() == effects


def test_mutations_succeed_with_the_token(secured: TestClient) -> None:
    created = place(secured, headers=GOOD_AUTH)
    assert created.status_code == 201, created.text
    order_id = created.json()["id"]

    resumed = secured.post(f"/orders/{order_id}/resume", headers=GOOD_AUTH)
    cancelled = secured.post(f"/orders/{order_id}/cancel", headers=GOOD_AUTH)

    assert resumed.status_code == 200, resumed.text
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"


def test_reads_need_the_token_too_but_health_and_metrics(secured: TestClient) -> None:
    order_id = place(secured, headers=GOOD_AUTH).json()["id"]

    for path in (f"/orders/{order_id}", "/orders", f"/orders/{order_id}/transitions"):
        assert secured.get(path).status_code == 401, path
        assert secured.get(path, headers=GOOD_AUTH).status_code == 200, path
    for path in ("/healthz", "/metrics"):
        assert secured.get(path).status_code == 200, path


# -- operations --------------------------------------------------------------------------


def test_healthz(client: TestClient, db_url: str) -> None:
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.json()["status"] == "ok"
    assert response.json()["database"] == (
        "sqlite" if db_url.startswith("sqlite") else "postgresql"
    )


def test_metrics_are_prometheus_text(client: TestClient) -> None:
    place(client)

    response = client.get("/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert "# TYPE order_saga_transitions_total counter" in text
    assert 'order_saga_transitions_total{scope="order",trigger="all_succeeded"}' in text
    assert 'order_saga_orders{status="completed"} 1.0' in text


def test_openapi_lists_the_order_paths(sqlite_client: TestClient) -> None:
    response = sqlite_client.get("/openapi.json")

    assert response.status_code == 200
    paths = response.json()["paths"]
    assert {"post", "get"} <= paths["/orders"].keys()
    for path in ("/orders/{order_id}", "/orders/{order_id}/transitions"):
        assert "get" in paths[path]
    for path in ("/orders/{order_id}/cancel", "/orders/{order_id}/resume"):
        assert "post" in paths[path]
    assert "/healthz" in paths and "/metrics" in paths
    assert "/diagram" in paths and "/orders/{order_id}/diagram" in paths


def test_corrupt_row_is_a_clear_500_and_resume_writes_nothing(
    client: TestClient, db_url: str
) -> None:
    from sqlalchemy import text

    order_id = place(client).json()["id"]
    engine = make_engine(db_url)
    key = uuid.UUID(order_id).hex if engine.dialect.name == "sqlite" else order_id
    with engine.begin() as conn:
        conn.execute(text("UPDATE orders SET state = 'warp_drive' WHERE id = :id"), {"id": key})
    for response in (client.get(f"/orders/{order_id}"), client.post(f"/orders/{order_id}/resume")):
        assert response.status_code == 500
        assert response.json()["detail"] == (
            f"order {order_id} is corrupt: state = 'warp_drive' is not one of the machine's states"
        )
    with engine.connect() as conn:
        count = conn.execute(text("SELECT count(*) FROM transitions")).scalar_one()
    engine.dispose()
    assert count == 9  # the completed order's history, nothing added
