"""One unreadable row (a state the installed machine does not declare) never takes a view
down: the console's list and "Needs attention", the heatmap, `GET /orders` and `order-saga
orders list` answer normally, list the other orders and show the bad row as what it is
(id, raw state, why). Both databases."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from markupsafe import escape

from downstream.seed import ORDINARY_USER_ID, SOLD_OUT_PRODUCT_ID
from tests.support.api import api, place
from tests.support.database import corrupt_state
from tests.support.processes import ORDER_SAGA
from tests.support.services import Downstream, set_faults
from tests.support.settings import saga_env

WHY = "state = 'warp_drive' is not one of the machine's states"
WHY_HTML = str(escape(WHY))


@pytest.fixture
def client(db_url: str, services_url: str) -> Iterator[TestClient]:
    with api(db_url, services_url, max_attempts=2) as c:
        yield c


@pytest.fixture
def orders(client: TestClient, db_url: str, downstream: Downstream) -> dict[str, str]:
    """A completed order, a parked one and a bad row (the parked one's twin, hand-edited)."""
    good = place(client).json()["id"]
    downstream.fault("user.refund", "error", count=1000)
    parked = place(client, product=SOLD_OUT_PRODUCT_ID).json()["id"]
    bad = place(client, product=SOLD_OUT_PRODUCT_ID).json()["id"]
    set_faults(downstream.url, ())
    corrupt_state(db_url, uuid.UUID(bad))
    return {"good": good, "parked": parked, "bad": bad}


def test_the_console_list_shows_the_bad_row_and_the_rest(
    client: TestClient, orders: dict[str, str]
) -> None:
    page = client.get("/ui")
    assert page.status_code == 200
    for order_id in orders.values():
        assert order_id in page.text
    assert 'class="unreadable" data-order="' + orders["bad"] in page.text
    assert "<code>warp_drive</code>" in page.text and WHY_HTML in page.text
    one = client.get(f"/ui/orders/{orders['bad']}")  # its own page names why
    assert one.status_code == 200 and WHY_HTML in one.text and "request_product" in one.text


def test_needs_attention_shows_the_bad_row_and_the_parked_one(
    client: TestClient, orders: dict[str, str]
) -> None:
    page = client.get("/ui", params={"status": "needs_attention"})
    assert page.status_code == 200
    assert orders["parked"] in page.text and orders["good"] not in page.text
    assert orders["bad"] in page.text and WHY_HTML in page.text  # its status column is intact


def test_the_heatmap_counts_around_the_bad_row(client: TestClient, orders: dict[str, str]) -> None:
    page = client.get("/ui/heatmap")
    assert page.status_code == 200 and page.text.count("<svg") == 1
    assert "<td>warp_drive</td>" in page.text and "not a state of this machine" in page.text


def test_get_orders_lists_the_bad_row_under_unreadable(
    client: TestClient, orders: dict[str, str]
) -> None:
    response = client.get("/orders")
    assert response.status_code == 200
    body = response.json()
    assert {o["id"] for o in body["orders"]} == {orders["good"], orders["parked"]}
    [bad] = body["unreadable"]
    assert (bad["id"], bad["state"]) == (orders["bad"], "warp_drive") and WHY in bad["why"]
    assert body["total"] == 3
    parked = client.get("/orders", params={"status": "needs_attention"}).json()
    assert [o["id"] for o in parked["orders"]] == [orders["parked"]]
    assert [u["id"] for u in parked["unreadable"]] == [orders["bad"]]


def test_orders_list_prints_the_bad_row(
    db_url: str, downstream: Downstream, orders: dict[str, str]
) -> None:
    env = saga_env(database_url=db_url, services_url=downstream.url)
    table = subprocess.run(
        [ORDER_SAGA, "orders", "list"], capture_output=True, text=True, env=env, timeout=60
    )
    assert table.returncode == 0, table.stderr
    assert "Traceback" not in table.stderr
    bad_line = next(line for line in table.stdout.splitlines() if orders["bad"] in line)
    assert "UNREADABLE" in bad_line and "warp_drive" in bad_line
    assert orders["good"] in table.stdout and orders["parked"] in table.stdout
    as_json = subprocess.run(
        [ORDER_SAGA, "orders", "list", "--json", "--user", str(ORDINARY_USER_ID)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    body = json.loads(as_json.stdout)
    assert [u["id"] for u in body["unreadable"]] == [orders["bad"]]
    assert body["total"] == 3
