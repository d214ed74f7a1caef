"""SPEC §4 actions on one order: `POST /orders/{id}/cancel` and `POST /orders/{id}/resume`,
including while another driver holds the order (409), on unknown ids (404), and runs that
outlast RESPOND_WITHIN (202 + Location, as `POST /orders`)."""

from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient

from downstream.seed import (
    MISSING_PRODUCT_ID,
    ORDINARY_USER_ID,
    POOR_USER_ID,
    WIDGET_ID,
)
from fsm.store import Store
from tests.support.api import (
    WIDGET_PRICE,
    api,
    assert_message,
    order_effects,
    place,
    wait_terminal,
)
from tests.support.services import Downstream
from tests.support.waiting import wait_until

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


def test_a_cancel_retried_as_the_first_one_ends_is_200_cancelled(
    client: TestClient, downstream: Downstream
) -> None:
    """The first cancel's run has committed `cancelled` but not yet given the order back
    (its lease release is one more commit): a retry in that gap is answered with the
    cancelled order, as any later one is, not a 409 conflict. The gap is held open here
    by this process's own claim on the order (what the first run still holds then)."""
    order_id = place(client).json()["id"]
    assert client.post(f"/orders/{order_id}/cancel").json()["status"] == "cancelled"
    effects = downstream.effects()
    executor = client.app.state.executor  # type: ignore[attr-defined]
    executor._reserve(uuid.UUID(order_id))  # the first run, not yet gone
    try:
        response = client.post(f"/orders/{order_id}/cancel")
    finally:
        executor._driving.discard(uuid.UUID(order_id))
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"
    assert downstream.effects() == effects


def test_cancel_unknown_order_is_404(client: TestClient) -> None:
    response = client.post(f"/orders/{uuid.uuid4()}/cancel")

    assert response.status_code == 404
    assert_message(response)


# -- POST /orders/{id}/resume ------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "user", "product"),
    [
        pytest.param("completed", ORDINARY_USER_ID, WIDGET_ID, id="completed"),
        pytest.param("failed", POOR_USER_ID, WIDGET_ID, id="failed"),
        pytest.param("rejected", ORDINARY_USER_ID, MISSING_PRODUCT_ID, id="rejected"),
    ],
)
def test_resume_terminal_order_is_a_noop(
    client: TestClient, downstream: Downstream, kind: str, user: int, product: int
) -> None:
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


# The API drives background runs and /cancel, /resume with one Executor, hence one lease
# owner, and the lease lets an owner re-take its own. So the executor refuses to claim an
# order it is driving right now (Executor._claim: 409 lease_lost) instead of driving it a
# second time or releasing the running run's lease. These two tests hold it to that.
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


# -- a run longer than RESPOND_WITHIN: 202 + Location, the run goes on -------------------


def test_a_resume_that_outlasts_respond_within_answers_202_and_goes_on(
    db_url: str, services_url: str, downstream: Downstream
) -> None:
    downstream.fault("inventory.restore", "error", count=3)  # the run's 3 attempts: parked
    with api(db_url, services_url, respond_within=0.2) as client:
        order_id = place(client, user=POOR_USER_ID).json()["id"]
        wait_until(
            lambda: client.get(f"/orders/{order_id}").json()["state"] == "needs_attention",
            what="the order to park",
        )
        downstream.fault("inventory.restore", "delay", count=1, seconds=1.0)

        response = client.post(f"/orders/{order_id}/resume")

        assert response.status_code == 202, response.text
        assert response.headers["Location"] == f"/orders/{order_id}"
        assert response.json()["state"] == "compensating"
        held = client.post(f"/orders/{order_id}/resume")  # its run still holds it
        assert held.status_code == 409 and held.json()["code"] == "lease_lost", held.text
        final = wait_terminal(client, order_id)
    assert (final["state"], final["steps"]["inventory"]) == ("failed", "compensated")
    effects = order_effects(downstream, order_id)
    assert effects[f"{order_id}:inventory:restore"] == 1


def test_a_cancel_with_prefer_respond_async_answers_202_at_once(
    client: TestClient, downstream: Downstream
) -> None:
    balance = downstream.balance(ORDINARY_USER_ID)
    order_id = place(client).json()["id"]

    response = client.post(f"/orders/{order_id}/cancel", headers={"Prefer": "respond-async"})

    assert response.status_code == 202, response.text
    assert response.headers["Location"] == f"/orders/{order_id}"
    assert response.headers["Preference-Applied"] == "respond-async"
    assert response.json()["state"] == "cancelling"  # committed before the answer
    assert wait_terminal(client, order_id)["state"] == "cancelled"
    assert downstream.balance(ORDINARY_USER_ID) == balance


def test_a_cancel_that_outlasts_respond_within_answers_202_and_goes_on(
    db_url: str, services_url: str, downstream: Downstream
) -> None:
    balance = downstream.balance(ORDINARY_USER_ID)
    with api(db_url, services_url, respond_within=0.2) as client:
        order_id = place(client).json()["id"]
        downstream.fault("user.refund", "delay", count=1, seconds=1.0)

        response = client.post(f"/orders/{order_id}/cancel")

        assert response.status_code == 202, response.text
        assert response.headers["Location"] == f"/orders/{order_id}"
        # Retried while the first goes on (a client that timed out, say): the same
        # cancellation, under way, not a 409 conflict.
        again = client.post(f"/orders/{order_id}/cancel")
        assert again.status_code == 202, again.text
        assert again.headers["Location"] == f"/orders/{order_id}"
        assert again.json()["state"] == "cancelling"
        assert wait_terminal(client, order_id)["state"] == "cancelled"
    assert downstream.balance(ORDINARY_USER_ID) == balance
    assert order_effects(downstream, order_id)[f"{order_id}:payment:refund"] == 1
