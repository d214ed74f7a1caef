"""SPEC §4 reads: `GET /orders/{id}`, `GET /orders` (filters, paging) and
`GET /orders/{id}/transitions` (the persisted history), with their 404/422 answers."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.orders import LIST_PARAMETERS
from downstream.seed import (
    MISSING_PRODUCT_ID,
    POOR_USER_ID,
    RICH_USER_ID,
    SOLD_OUT_PRODUCT_ID,
    WIDGET_ID,
)
from tests.support.api import (
    WIDGET_PRICE,
    api,
    assert_message,
    assert_utc,
    place,
)
from tests.support.cursors import HAND_MADE_CURSORS, hand_made_cursor
from tests.support.database import pg_database_with
from tests.support.services import Downstream


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


def test_timestamps_are_utc_whatever_the_servers_time_zone(services_url: str) -> None:
    """SPEC: every timestamp in UTC, also from a PostgreSQL database whose sessions
    default to another zone (they came back as +05:30)."""
    with pg_database_with(timezone="Asia/Kolkata") as url, api(url, services_url) as client:
        created = place(client, user=RICH_USER_ID).json()
        assert_utc(created["created_at"])
        order = client.get(f"/orders/{created['id']}").json()
        listed = client.get("/orders").json()["orders"][0]
        history = client.get(f"/orders/{created['id']}/transitions").json()
    for stamp in (order["created_at"], order["updated_at"], listed["created_at"]):
        assert_utc(stamp)
    for line in history:
        assert_utc(line["created_at"])


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


def test_list_honours_every_filter_with_a_total_and_a_cursor(client: TestClient) -> None:
    ids = [
        place(client).json()["id"],  # completed
        place(client, user=POOR_USER_ID).json()["id"],  # failed
        place(client, product=MISSING_PRODUCT_ID).json()["id"],  # rejected
        place(client, user=RICH_USER_ID).json()["id"],  # completed
    ]

    def found(**params: Any) -> list[str]:
        body = client.get("/orders", params=params).json()
        assert body["total"] == len(body["orders"]) + len(body["unreadable"]), body
        return [o["id"] for o in body["orders"]]

    assert found(user_id=POOR_USER_ID) == [ids[1]]
    assert found(product_id=MISSING_PRODUCT_ID) == [ids[2]]
    assert found(state="rejected") == [ids[2]]
    assert found(status="completed", user_id=RICH_USER_ID) == [ids[3]]
    assert found(unmoved_for=3600) == []
    assert found(unmoved_for=0) == ids[::-1]
    assert found(id_prefix=ids[1][:8]) == [ids[1]]
    first = client.get("/orders", params={"limit": 3}).json()
    assert first["total"] == 4 and first["next_cursor"]
    rest = client.get("/orders", params={"limit": 3, "cursor": first["next_cursor"]}).json()
    assert [o["id"] for o in first["orders"] + rest["orders"]] == ids[::-1]
    assert rest["next_cursor"] is None and rest["total"] == 4
    bad = client.get("/orders", params={"cursor": "not-ours"})
    assert bad.status_code == 422 and bad.json()["errors"][0]["loc"] == ["query", "cursor"]


@pytest.mark.parametrize(
    "params",
    [
        {"status": "bogus"},
        {"limit": 0},
        {"limit": 501},
        {"limit": "ten"},
        {"offset": -1},
        {"offset": 10**20},
        {"user_id": 0},
        {"state": "warp_drive"},
        {"unmoved_for": -1},
        {"id_prefix": "xyz"},
    ],
    ids=[
        "unknown status",
        "limit 0",
        "limit too big",
        "limit not int",
        "negative offset",
        "offset overflows",
        "user 0",
        "unknown state",
        "negative age",
        "id prefix not hex",
    ],
)
def test_list_rejects_bad_query(sqlite_client: TestClient, params: dict[str, Any]) -> None:
    response = sqlite_client.get("/orders", params=params)

    assert response.status_code == 422, response.text
    assert_message(response)


@pytest.mark.parametrize(
    ("name", "values"),
    [
        ("status", ["completed", "failed"]),
        ("state", ["completed", "failed"]),
        ("user_id", ["1", "2"]),
        ("product_id", ["1", "1"]),
        ("unmoved_for", ["1", "2"]),
        ("id_prefix", ["ab", "cd"]),
        ("limit", ["1", "2"]),
        ("offset", ["0", "1"]),
        ("cursor", ["a", "b"]),
    ],
)
def test_a_parameter_given_twice_is_422_naming_it(
    sqlite_client: TestClient, name: str, values: list[str]
) -> None:
    """`?status=completed&status=failed` listed the failed ones alone (the last won)."""
    assert name in LIST_PARAMETERS
    response = sqlite_client.get("/orders", params=[(name, v) for v in values])

    assert response.status_code == 422, response.text
    [error] = response.json()["errors"]
    assert error["loc"] == ["query", name] and "2 times" in error["msg"]
    assert_message(response)


def test_every_list_parameter_is_checked_for_repeats(sqlite_client: TestClient) -> None:
    document = sqlite_client.get("/openapi.json").json()
    declared = {p["name"] for p in document["paths"]["/orders"]["get"]["parameters"]}
    assert declared == set(LIST_PARAMETERS)


def test_a_cursor_with_an_offset_is_422_on_the_offset(client: TestClient) -> None:
    """The offset was dropped silently: the client got the cursor's page, not the one it
    asked for."""
    for _ in range(3):
        place(client, product=MISSING_PRODUCT_ID)
    cursor = client.get("/orders", params={"limit": 1}).json()["next_cursor"]
    assert client.get("/orders", params={"limit": 1, "cursor": cursor}).status_code == 200

    response = client.get("/orders", params={"limit": 1, "cursor": cursor, "offset": 1})

    assert response.status_code == 422, response.text
    [error] = response.json()["errors"]
    assert error["loc"] == ["query", "offset"] and "cursor" in error["msg"]


@pytest.mark.parametrize("raw", HAND_MADE_CURSORS.values(), ids=HAND_MADE_CURSORS.keys())
def test_hand_made_cursor_is_422_on_the_cursor(sqlite_client: TestClient, raw: str) -> None:
    cursor = hand_made_cursor(raw)

    response = sqlite_client.get("/orders", params={"limit": 1, "cursor": cursor})

    assert response.status_code == 422, response.text
    [error] = response.json()["errors"]
    assert error["loc"] == ["query", "cursor"]
    assert_message(response)


@pytest.mark.parametrize("prefix", ["-", "----"])
def test_id_prefix_without_a_digit_is_422_on_the_id_prefix(
    sqlite_client: TestClient, prefix: str
) -> None:
    response = sqlite_client.get("/orders", params={"id_prefix": prefix})

    assert response.status_code == 422, response.text
    [error] = response.json()["errors"]
    assert error["loc"] == ["query", "id_prefix"] and error["input"] == prefix
    assert "not the start of an order id" in error["msg"]


def test_list_rows_say_why_as_the_order_does(client: TestClient, downstream: Downstream) -> None:
    """Each live row carries its `why` (it was always null in the list, though the CLI's
    and the console's lists had it), and a parked one says how to retry it now in this
    surface's words with its own id (it said "Retry on this page", "--order ID")."""
    downstream.fault("user.refund", "error", count=1000)
    parked = place(client, product=SOLD_OUT_PRODUCT_ID).json()["id"]
    downstream.clear_faults()
    done = place(client).json()["id"]

    rows = {o["id"]: o for o in client.get("/orders").json()["orders"]}

    assert rows[parked]["state"] == "needs_attention" and rows[done]["state"] == "completed"
    assert rows[parked]["why"] == client.get(f"/orders/{parked}").json()["why"]
    assert rows[parked]["why"]["kind"] == "parked" and rows[done]["why"] is None
    summary = rows[parked]["why"]["summary"]
    assert f"`POST /orders/{parked}/resume`" in summary
    assert f"`order-saga resume --order {parked}`" in summary
    assert "this page" not in summary and " ID" not in summary


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
