"""One unreadable row (a state the installed machine does not declare) never takes a view
down: the console's list and "Needs attention", the heatmap, `GET /orders` and `order-saga
orders list` answer normally, list the other orders and show the bad row as what it is
(id, raw state, why); `order-saga diagram --order` of the bad row says why in one line.
Both databases."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from markupsafe import escape
from sqlalchemy import text

from downstream.seed import ORDINARY_USER_ID, SOLD_OUT_PRODUCT_ID
from fsm.queries import Reads
from fsm.store import make_engine
from fsm.version import MACHINE_VERSION
from tests.support.api import api, place
from tests.support.database import corrupt_state
from tests.support.processes import ORDER_SAGA, run_cli
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


def test_the_diagram_of_the_bad_row_is_one_line_and_exit_1(
    db_url: str, orders: dict[str, str]
) -> None:
    """`order-saga diagram --order` cannot draw a state the machine does not declare: it
    says so in one line, never a traceback; the other orders still draw."""
    bad = run_cli("diagram", "--order", orders["bad"], ORDER_SAGA_DATABASE_URL=db_url)
    assert bad.returncode == 1, bad.stderr
    assert bad.stderr == f"order-saga: order {orders['bad']} is corrupt: {WHY}\n"
    good = run_cli("diagram", "--order", orders["good"], ORDER_SAGA_DATABASE_URL=db_url)
    assert good.returncode == 0, good.stderr
    assert good.stdout.startswith("stateDiagram")


def test_the_log_of_the_bad_row_is_served_the_row_is_a_corrupt_order(
    client: TestClient, orders: dict[str, str]
) -> None:
    """Before, `GET /orders/{id}/transitions` of the bad row answered 500 while the console
    showed the same log. Now the log is served; the order itself is the corrupt-order
    problem, naming why."""
    log = client.get(f"/orders/{orders['bad']}/transitions")
    one = client.get(f"/orders/{orders['bad']}")

    assert log.status_code == 200, log.text
    assert log.json()[0]["from_state"] == "pending" and len(log.json()) > 2
    assert one.status_code == 500 and one.json()["code"] == "corrupt_order", one.text
    assert WHY in one.json()["detail"]


# -- a value SQLAlchemy cannot parse ---------------------------------------------------------
# SQLite keeps any text in a timestamp or JSON column; PostgreSQL's typed columns (timestamptz,
# json) refuse 'garbage' and '{bad' at the write, so these rows exist on SQLite only (the
# other kind of corruption PostgreSQL can hold, a state no machine declares, is tested above
# on both databases).
SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
BROKEN = {
    "updated_at": "garbage",
    "created_at": "garbage",
    "lease_expires_at": "soon",
    "attempts": "{bad",
    "amount": "abc",
    "version": "v",
}


def corrupt_column(db_url: str, order_id: str, column: str, value: str) -> None:
    """A hand edit of one column of one order, below SQLAlchemy (as `sqlite3 d.db` does)."""
    with sqlite3.connect(db_url.removeprefix("sqlite:///")) as conn:
        conn.execute(
            f"UPDATE orders SET {column} = ? WHERE id = ?", (value, uuid.UUID(order_id).hex)
        )
    conn.close()


@SQLITE_ONLY
@pytest.mark.parametrize(("column", "value"), BROKEN.items(), ids=BROKEN.keys())
def test_a_broken_value_is_one_unreadable_row(
    client: TestClient, db_url: str, column: str, value: str
) -> None:
    good, bad = place(client).json()["id"], place(client).json()["id"]
    corrupt_column(db_url, bad, column, value)

    listing = client.get("/orders")
    one = client.get(f"/orders/{bad}")

    assert listing.status_code == 200, listing.text  # not a 422 on a cursor never sent
    body = listing.json()
    assert [o["id"] for o in body["orders"]] == [good] and body["total"] == 2
    [unreadable] = body["unreadable"]
    assert unreadable["id"] == bad and f"{column} = {value!r}" in unreadable["why"]
    assert one.status_code == 500 and one.json()["code"] == "corrupt_order", one.text
    assert f"order {bad} is corrupt: {column}" in one.json()["detail"]
    assert client.get(f"/orders/{good}").status_code == 200


@SQLITE_ONLY
def test_pages_go_past_a_broken_created_at(client: TestClient, db_url: str) -> None:
    ids = [place(client).json()["id"] for _ in range(3)]
    corrupt_column(db_url, ids[1], "created_at", "garbage")
    seen: list[str] = []
    cursor = None
    for _ in range(5):
        params = {"limit": 1} | ({"cursor": cursor} if cursor else {})
        page = client.get("/orders", params=params)
        assert page.status_code == 200, page.text
        body = page.json()
        seen += [o["id"] for o in body["orders"] + body["unreadable"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(ids)


@SQLITE_ONLY
def test_a_broken_updated_at_leaves_the_stuck_gauge_to_the_others(
    client: TestClient, db_url: str
) -> None:
    good, bad = place(client).json()["id"], place(client).json()["id"]
    corrupt_column(db_url, good, "state", "steps_running")  # looks stuck: the gauge reads it
    corrupt_column(db_url, bad, "state", "compensating")
    corrupt_column(db_url, bad, "updated_at", "garbage")
    engine = make_engine(db_url)
    try:
        found = Reads(engine).oldest_unmoved_by_state()
    finally:
        engine.dispose()

    assert set(found) == {"steps_running"}


@SQLITE_ONLY
@pytest.mark.parametrize("column", ["updated_at", "attempts"])
def test_orders_list_and_show_on_a_broken_value(
    client: TestClient, db_url: str, downstream: Downstream, column: str
) -> None:
    good, bad = place(client).json()["id"], place(client).json()["id"]
    corrupt_column(db_url, bad, column, BROKEN[column])
    env = saga_env(database_url=db_url, services_url=downstream.url)

    table = subprocess.run(
        [ORDER_SAGA, "orders", "list"], capture_output=True, text=True, env=env, timeout=60
    )
    show = subprocess.run(
        [ORDER_SAGA, "orders", "show", bad], capture_output=True, text=True, env=env, timeout=60
    )

    assert table.returncode == 0, table.stderr
    bad_line = next(line for line in table.stdout.splitlines() if bad in line)
    assert "UNREADABLE" in bad_line and good in table.stdout
    [line] = show.stderr.strip().splitlines()  # one line, no traceback
    assert show.returncode == 1 and line.startswith(f"order-saga: order {bad} is corrupt: {column}")


# -- the log of an older machine, a detail that is not JSON -------------------------------


def corrupt_transition(db_url: str, order_id: str, column: str, value: str) -> None:
    """A hand edit of the order's last transition (or an older machine's row: the log keeps
    the names it was written with, README "Upgrading the machine safely")."""
    engine = make_engine(db_url)
    sqlite = engine.dialect.name == "sqlite"
    key = uuid.UUID(order_id).hex if sqlite else order_id
    new = ":v" if sqlite or column != "detail" else "CAST(:v AS json)"
    last = "SELECT max(seq) FROM transitions WHERE order_id = :id AND scope = 'order'"
    where = f"order_id = :id AND seq = ({last})"
    try:
        with engine.begin() as conn:
            conn.execute(
                text(f"UPDATE transitions SET {column} = {new} WHERE {where}"),
                {"v": value, "id": key},
            )
    finally:
        engine.dispose()


def show(db_url: str, downstream: Downstream, order_id: str, *args: str) -> Any:
    env = saga_env(database_url=db_url, services_url=downstream.url)
    return subprocess.run(
        [ORDER_SAGA, "orders", "show", order_id, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_an_older_machines_state_in_the_log_is_shown_as_written(
    client: TestClient, db_url: str, downstream: Downstream
) -> None:
    order_id = place(client).json()["id"]
    corrupt_transition(db_url, order_id, "to_state", "legacy_state")

    log = client.get(f"/orders/{order_id}/transitions")
    table = show(db_url, downstream, order_id)
    as_json = show(db_url, downstream, order_id, "--json")

    assert log.status_code == 200, log.text
    last = log.json()[-1]
    assert (last["scope"], last["to_state"]) == ("order", "legacy_state")
    assert last["machine_version"] == MACHINE_VERSION  # which machine wrote it
    assert log.json()[0]["from_state"] == "pending"  # the known ones as before
    assert table.returncode == 0 and "legacy_state" in table.stdout, table.stderr
    assert json.loads(as_json.stdout)["timeline"][-1]["to_state"] == "legacy_state"


def assert_detail_shown_as_unreadable(
    client: TestClient, db_url: str, downstream: Downstream, stored: str
) -> None:
    order_id = place(client).json()["id"]
    corrupt_transition(db_url, order_id, "detail", stored)

    log = client.get(f"/orders/{order_id}/transitions")
    table = show(db_url, downstream, order_id)

    assert log.status_code == 200, log.text
    assert log.json()[-1]["detail"] == {"unreadable": stored}
    found = next(t for t in log.json() if t["trigger"] == "product_found")
    assert "product" in found["detail"]  # the other rows as they were
    assert table.returncode == 0, table.stderr
    assert "unreadable" in table.stdout and "Traceback" not in table.stderr


def test_a_detail_that_is_no_json_object_is_shown_as_unreadable(
    client: TestClient, db_url: str, downstream: Downstream
) -> None:
    # PostgreSQL's json column takes any JSON: a detail that is no object can be written there.
    assert_detail_shown_as_unreadable(client, db_url, downstream, "[1, 2]")


@SQLITE_ONLY  # PostgreSQL's json column refuses text that is not JSON
def test_a_detail_that_is_not_json_is_shown_as_unreadable(
    client: TestClient, db_url: str, downstream: Downstream
) -> None:
    assert_detail_shown_as_unreadable(client, db_url, downstream, "not json{")


def test_a_detail_holding_a_lone_surrogate_is_shown_as_unreadable(
    client: TestClient, db_url: str, downstream: Downstream
) -> None:
    # Stored before answers were cleaned of them (a product description cut mid-emoji):
    # decoded, the string could not be sent, and the whole log answered 500.
    stored = '{"product": {"description": "widget \\ud83d"}}'
    assert_detail_shown_as_unreadable(client, db_url, downstream, stored)


@SQLITE_ONLY  # PostgreSQL's seq column is an integer
def test_a_seq_that_is_no_integer_is_a_corrupt_order(
    client: TestClient, db_url: str, downstream: Downstream
) -> None:
    """The log is ordered by `seq`: text there made the API and the console answer a bare
    500 and `orders show` / `diagram --order` print a TypeError traceback. Now it is a
    corrupt order like any other: the problem names the row, the CLI says so in one line."""
    order_id = place(client).json()["id"]
    corrupt_transition(db_url, order_id, "seq", "abc")
    why = f"order {order_id} is corrupt: transition seq = 'abc' is not an integer"

    for path in (f"/orders/{order_id}/transitions", f"/ui/orders/{order_id}"):
        answer = client.get(path)
        assert answer.status_code == 500 and answer.json()["code"] == "corrupt_order", answer.text
        assert answer.json()["detail"] == why
    for args in (("orders", "show", order_id), ("diagram", "--order", order_id)):
        cli = run_cli(*args, ORDER_SAGA_DATABASE_URL=db_url)
        assert (cli.returncode, cli.stderr) == (1, f"order-saga: {why}\n")


def test_attempts_holding_a_json_string_is_no_object(client: TestClient, db_url: str) -> None:
    """JSON text is decoded once: a JSON string that holds an object's text is a string
    (PostgreSQL's driver decodes json columns itself; decoding its answer again took it
    for the object)."""
    good, bad = place(client).json()["id"], place(client).json()["id"]
    engine = make_engine(db_url)
    sqlite = engine.dialect.name == "sqlite"
    new = ":v" if sqlite else "CAST(:v AS json)"
    try:
        with engine.begin() as conn:
            conn.execute(
                text(f"UPDATE orders SET attempts = {new} WHERE id = :id"),
                {"v": '"{}"', "id": uuid.UUID(bad).hex if sqlite else bad},
            )
    finally:
        engine.dispose()

    body = client.get("/orders").json()

    assert [o["id"] for o in body["orders"]] == [good]
    assert [u["id"] for u in body["unreadable"]] == [bad]
    assert client.get(f"/orders/{bad}").json()["code"] == "corrupt_order"
