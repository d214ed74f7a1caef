"""SPEC §4 `POST /orders`: the answer codes (201, 202, 404, 422), bad bodies, and the
Idempotency-Key contract; against the reference services over real HTTP, on SQLite and
PostgreSQL."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.direct import Shortcut
from downstream.seed import (
    MISSING_PRODUCT_ID,
    ORDINARY_USER_ID,
    POOR_USER_ID,
    SOLD_OUT_PRODUCT_ID,
    WIDGET_ID,
)
from tests.support.api import (
    TERMINAL,
    WIDGET_PRICE,
    api,
    assert_message,
    assert_utc,
    order_effects,
    place,
    wait_terminal,
)
from tests.support.services import Downstream

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
    assert response.headers["Preference-Applied"] == "respond-async"  # RFC 7240 §3
    assert order["state"] not in TERMINAL
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
        assert "Preference-Applied" not in response.headers  # none was asked for
        assert order["status"] in {"pending", "running"}
        assert client.get(response.headers["Location"]).status_code == 200
        final = wait_terminal(client, order["id"])
    assert final["status"] == "completed"
    assert final["shipping"]["address"]


VALID = {"user_id": ORDINARY_USER_ID, "product_id": WIDGET_ID, "quantity": 1}
BAD_BODIES = [
    pytest.param({"user_id": ORDINARY_USER_ID, "product_id": WIDGET_ID}, id="missing field"),
    pytest.param({**VALID, "user_id": str(ORDINARY_USER_ID)}, id="string user id"),
    pytest.param({**VALID, "product_id": str(WIDGET_ID)}, id="string product id"),
    pytest.param({**VALID, "quantity": 1.5}, id="float quantity"),
    pytest.param({**VALID, "quantity": 1.0}, id="integral float"),
    pytest.param({**VALID, "quantity": True}, id="bool quantity"),
    pytest.param({**VALID, "quantity": 0}, id="zero quantity"),
    pytest.param({**VALID, "quantity": -3}, id="negative quantity"),
    pytest.param({**VALID, "user_id": 0}, id="zero user id"),
    pytest.param({**VALID, "product_id": None}, id="null product"),
    pytest.param({**VALID, "coupon": "FREE"}, id="extra field"),
    pytest.param(list(VALID.values()), id="not an object"),
]


@pytest.mark.parametrize("body", BAD_BODIES)
def test_create_rejects_bad_input(sqlite_client: TestClient, body: Any) -> None:
    response = sqlite_client.post("/orders", json=body)

    assert response.status_code == 422, response.text
    assert_message(response)
    assert sqlite_client.get("/orders").json()["orders"] == []  # nothing stored, so no call


@pytest.mark.parametrize(
    "content",
    [
        pytest.param("not json", id="not json"),
        pytest.param(f'{{"user_id": {ORDINARY_USER_ID},', id="truncated"),
        pytest.param("", id="empty"),
    ],
)
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


# A well-formed POST /orders skips FastAPI's parameter solving (`api.direct`); what the
# direct reader declines goes to FastAPI's handler: both answer alike.
@pytest.mark.parametrize(
    ("headers", "status"),
    [
        pytest.param({"Content-Type": "application/json"}, 201, id="direct"),
        pytest.param({"Content-Type": "application/json; charset=utf-8"}, 201, id="charset"),
        pytest.param({"Content-Type": "application/vnd.shop+json"}, 201, id="a +json type"),
        pytest.param({"Content-Type": "text/plain"}, 415, id="not declared json"),
        pytest.param({"Idempotency-Key": "k" * 200}, 201, id="longest key"),
        pytest.param({"Idempotency-Key": " padded"}, 422, id="key with a leading space"),
        pytest.param({"Idempotency-Key": "a b"}, 201, id="key with an inner space"),
    ],
)
def test_direct_and_checked_paths_answer_alike(
    sqlite_client: TestClient, headers: dict[str, str], status: int
) -> None:
    content = f'{{"user_id": {ORDINARY_USER_ID}, "product_id": {WIDGET_ID}, "quantity": 1}}'
    before = sqlite_client.get("/orders").json()["total"]
    response = sqlite_client.post(
        "/orders", content=content, headers={"Content-Type": "application/json", **headers}
    )

    assert response.status_code == status, response.text
    if status == 201:
        assert response.json()["status"] == "completed"
    else:
        assert_message(response)
        assert sqlite_client.get("/orders").json()["total"] == before  # nothing stored


def test_a_well_formed_post_takes_the_shortcut_past_the_router(
    sqlite_client: TestClient,
) -> None:
    """`api.direct.Shortcut` serves POST /orders before FastAPI's router (the route's
    reader, not the route, sees the request): the answer is the same."""
    response = place(sqlite_client)
    assert response.status_code == 201, response.text

    layer: Any = sqlite_client.app.middleware_stack  # type: ignore[attr-defined]
    while not isinstance(layer, Shortcut):
        layer = layer.app
    assert ("POST", "/orders") in layer.readers
    assert response.headers["X-Request-ID"]  # inside the request-id middleware


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


def test_concurrent_posts_with_one_key_make_one_order(
    client: TestClient, downstream: Downstream
) -> None:
    """20 at once (a client's retries racing each other): one order, one charge; each
    answer is that order."""
    balance = downstream.balance(ORDINARY_USER_ID)
    key = {"Idempotency-Key": f"racing-{uuid.uuid4()}", "Prefer": "respond-async"}

    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(lambda _: place(client, headers=key), range(20)))

    assert {a.status_code for a in answers} <= {201, 202}, [a.text for a in answers]
    (order_id,) = {a.json()["id"] for a in answers}
    assert wait_terminal(client, order_id)["status"] == "completed"
    assert [o["id"] for o in client.get("/orders").json()["orders"]] == [order_id]
    assert downstream.balance(ORDINARY_USER_ID) == balance - WIDGET_PRICE


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


def test_idempotency_key_retry_of_an_order_ended_since_is_201(
    db_url: str, services_url: str, downstream: Downstream
) -> None:
    """Every terminal state answers a replay 201, the operator's ends too: a parked order
    resolved by hand, a completed one cancelled since (the replay is not "still running")."""
    with api(db_url, services_url, max_attempts=2) as client:
        downstream.fault("user.refund", "error", count=1000)  # compensation fails: parked
        parked_key = {"Idempotency-Key": f"parked-{uuid.uuid4()}"}
        parked = place(client, product=SOLD_OUT_PRODUCT_ID, headers=parked_key).json()
        downstream.clear_faults()
        assert parked["status"] == "needs_attention", parked
        resolved = client.post(f"/orders/{parked['id']}/resolve", json={"reason": "by hand"})
        assert resolved.json()["status"] == "resolved", resolved.text
        done_key = {"Idempotency-Key": f"done-{uuid.uuid4()}"}
        done = place(client, headers=done_key).json()
        cancelled = client.post(f"/orders/{done['id']}/cancel")
        assert cancelled.json()["status"] == "cancelled", cancelled.text

        replays = [
            place(client, product=SOLD_OUT_PRODUCT_ID, headers=parked_key),
            place(client, headers=done_key),
        ]

    assert [r.status_code for r in replays] == [201, 201], [r.text for r in replays]
    assert [r.json()["status"] for r in replays] == ["resolved", "cancelled"]
    assert all("Location" not in r.headers for r in replays)


# -- GET /orders/{id} --------------------------------------------------------------------
