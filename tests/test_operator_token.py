"""Every operator command works against a `serve` that requires a token (issue 15, item 2).

One real `order-saga serve` per database, with ORDER_SAGA_API_TOKEN set, its reference
services mounted under /services (so calls to them need the token too) and no sweep of
its own. Against it, as an operator would: `orders cancel`, `orders resolve`,
`resume --order`, `resume` and `worker`, each a real process with the same token in its
environment. Each order ends in the right terminal state, and the services' books (read
through their GET endpoints) show money and stock conserved.

The bug this pins: `orders cancel` opened the engine without the token, so its refund,
restore and cancel calls got 401, the command exited 3 and a completed order was parked.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from downstream.seed import ORDINARY_USER_ID, RICH_USER_ID, SOLD_OUT_PRODUCT_ID, WIDGET_ID
from fsm.models import Order
from fsm.wiring import open_store
from tests.support.database import stuck_orders
from tests.support.processes import Result, Saga, command, run_saga
from tests.support.services import Books, Downstream, assert_conserved, free_port
from tests.support.serving import Served, fresh_database
from tests.support.settings import cli_settings, saga_env
from tests.support.waiting import wait_until

TOKEN = "operator-s3cret"
# Small retry budgets: a failing refund parks its order in a fraction of a second.
BUDGET = {"max_attempts": 2, "backoff_base": 0.01, "backoff_max": 0.05, "http_timeout": 5}
TERMINAL = {"completed", "failed", "rejected", "cancelled", "resolved"}


class Serve:
    """`order-saga serve` with the token, its embedded services and no sweep; the
    environment the operator's commands run with (the same token, `serve` as the place
    of the reference services)."""

    def __init__(self, database_url: str, directory: Path) -> None:
        port = free_port()  # known before start: the commands' fallback URL names it
        self.url = f"http://127.0.0.1:{port}"
        self.env = saga_env(
            database_url=database_url,
            api_token=TOKEN,
            services_db=directory / "services.db",
            fallback_services_url=f"{self.url}/services",
            worker_metrics_port=0,
            **BUDGET,
        )
        self.served = Served(self.env, port=port)
        self.api = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
        )
        self.downstream = Downstream(f"{self.url}/services", token=TOKEN)

    def place(self, user: int, product: int) -> uuid.UUID:
        body = {"user_id": user, "product_id": product, "quantity": 1}
        placed = self.api.post("/orders", json=body)
        assert placed.status_code in (201, 202), placed.text
        return uuid.UUID(placed.json()["id"])

    def status(self, order_id: uuid.UUID) -> str:
        answer = self.api.get(f"/orders/{order_id}")
        assert answer.status_code == 200, answer.text
        status: str = answer.json()["status"]
        return status

    def until(self, order_id: uuid.UUID, status: str) -> None:
        wait_until(lambda: self.status(order_id) == status, 30, what=f"{order_id} {status}")


@pytest.fixture(params=["sqlite", "postgresql"])
def serve(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Serve]:
    with fresh_database(request.param, str(tmp_path)) as url:
        server = Serve(url, tmp_path)
        try:
            server.served.wait_ready()
            yield server
        finally:
            server.api.close()
            server.served.stop()


def operator(*args: str, env: dict[str, str]) -> Result:
    result = run_saga(*args, env=env)
    assert result.returncode == 0, result.explain()
    return result


def orders(database_url: str, ids: list[uuid.UUID]) -> list[Order]:
    with open_store(cli_settings(database_url)) as store:
        return [store.get(oid) for oid in ids]


def new_stuck(database_url: str, n: int) -> list[uuid.UUID]:
    """Orders a crashed process left behind: pending, unleased, nothing called yet."""
    with open_store(cli_settings(database_url)) as store:
        return stuck_orders(store, n, user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1)


@pytest.mark.slow
def test_every_operator_command_works_under_a_token(serve: Serve) -> None:
    env, url = serve.env, serve.env["ORDER_SAGA_DATABASE_URL"]
    books = Books.read(serve.downstream, users=[ORDINARY_USER_ID], products=[WIDGET_ID])
    rich_before = serve.downstream.balance(RICH_USER_ID)

    # `orders cancel`: refund, restore, cancel the shipment, all through the token.
    placed = serve.place(ORDINARY_USER_ID, WIDGET_ID)
    serve.until(placed, "completed")
    operator("cancel", str(placed), env=env)
    assert serve.status(placed) == "cancelled"

    # `orders resolve`: an order parked because its refund fails, fixed by hand.
    serve.downstream.fault("user.refund", "error", count=1000)
    parked = serve.place(RICH_USER_ID, SOLD_OUT_PRODUCT_ID)  # paid, then sold out
    serve.until(parked, "needs_attention")
    serve.downstream.clear_faults()
    operator("orders", "resolve", str(parked), "--reason", "refunded by hand", env=env)
    assert serve.status(parked) == "resolved"

    # `resume --order`: one order left pending by a crash.
    one = new_stuck(url, 1)
    operator("resume", "--order", str(one[0]), env=env)

    # `resume`: every stuck order.
    several = new_stuck(url, 3)
    resumed = operator("resume", "--older-than", "0", env=env)
    assert "completed 3" in resumed.stdout, resumed.explain()

    # `worker`: claims and drives stuck orders until stopped.
    swept = new_stuck(url, 3)
    worker = Saga(command("worker", "--interval", "0.1", "--older-than", "0"), env)
    try:
        wait_until(
            lambda: {o.status for o in orders(url, swept)} <= TERMINAL,
            60,
            what="the worker to drive every stuck order",
            alive=worker.running,
        )
    finally:
        stopped = worker.stop()  # SIGTERM: it releases its leases and exits 0
    assert stopped.returncode == 0, stopped.explain()

    driven = orders(url, [placed, *one, *several, *swept])
    assert [o.status for o in driven] == ["cancelled"] + ["completed"] * 7
    assert_conserved(serve.downstream, books, driven)
    # The parked order's charge stays until the operator's own refund: charged once,
    # never refunded by the saga, and nothing taken from the sold-out stock.
    (resolved,) = orders(url, [parked])
    assert resolved.amount is not None
    assert serve.downstream.balance(RICH_USER_ID) == rich_before - resolved.amount
    effects = serve.downstream.effects()
    assert effects.get(f"{parked}:payment:deduct") == 1
    assert f"{parked}:payment:refund" not in effects
    assert serve.downstream.stock(SOLD_OUT_PRODUCT_ID) == 0
