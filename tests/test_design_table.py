"""SPEC §1, row by row: the final status, the exact compensations, the persisted history
and the downstream state afterwards, through the reference services over real HTTP, on
SQLite and PostgreSQL."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from downstream.seed import (
    MAX_UNITS_PER_SHIPMENT,
    MISSING_PRODUCT_ID,
    ORDINARY_USER_ID,
    POOR_USER_ID,
    SOLD_OUT_PRODUCT_ID,
    WIDGET_ID,
)
from fsm.executor import Executor
from fsm.store import Store
from tests.support.services import Downstream

OK, NO, NOT_CALLED = "ok", "failed", "not called"


@dataclass(frozen=True)
class Row:
    user: int
    product: int
    quantity: int
    payment: str
    inventory: str
    shipping: str
    status: str
    compensated: frozenset[str] = field(default_factory=frozenset)
    cancel: bool = False


# The seed's named ids (downstream/seed.py); more than MAX_UNITS_PER_SHIPMENT cannot ship.
PAYS, POOR, WIDGET = ORDINARY_USER_ID, POOR_USER_ID, WIDGET_ID
SOLD_OUT, MISSING, TOO_MANY = SOLD_OUT_PRODUCT_ID, MISSING_PRODUCT_ID, MAX_UNITS_PER_SHIPMENT + 1
ROWS = {
    # row 1: found | success | success | success -> completed, no action
    "completed": Row(PAYS, WIDGET, 1, OK, OK, OK, "completed"),
    # row 2: 404 | not called | not called | not called -> rejected, call nothing else
    "rejected": Row(PAYS, MISSING, 1, NOT_CALLED, NOT_CALLED, NOT_CALLED, "rejected"),
    # row 3: found | failed | success | success -> restore inventory, cancel shipping
    "payment-failed": Row(
        POOR, WIDGET, 1, NO, OK, OK, "failed", frozenset({"inventory", "shipping"})
    ),
    # row 4: found | success | failed | success -> refund user, cancel shipping
    "inventory-failed": Row(
        PAYS, SOLD_OUT, 1, OK, NO, OK, "failed", frozenset({"payment", "shipping"})
    ),
    # row 5: found | success | success | failed -> refund user, restore inventory
    "shipping-failed": Row(
        PAYS, WIDGET, TOO_MANY, OK, OK, NO, "failed", frozenset({"payment", "inventory"})
    ),
    # row 6: found | failed | failed | success -> cancel shipping
    "payment-inventory-failed": Row(
        POOR, SOLD_OUT, 1, NO, NO, OK, "failed", frozenset({"shipping"})
    ),
    # row 7: found | failed | failed | failed -> nothing to compensate
    "all-failed": Row(POOR, SOLD_OUT, TOO_MANY, NO, NO, NO, "failed"),
    # cancellation: a completed order cancelled by its owner -> refund, restore, cancel
    "cancelled": Row(
        PAYS,
        WIDGET,
        2,
        OK,
        OK,
        OK,
        "cancelled",
        frozenset({"payment", "inventory", "shipping"}),
        cancel=True,
    ),
}


def expected_history(row: Row) -> dict[str, list[str]]:
    """Each scope's triggers in commit order (steps interleave, so compare per scope)."""
    order = ["request_product"]
    if row.payment == NOT_CALLED:
        order.append("product_missing")
    else:
        order.append("product_found")
        all_ok = (row.payment, row.inventory, row.shipping) == (OK, OK, OK)
        order.append("all_succeeded" if all_ok else "some_failed")
        order += ["cancel", "cancellation_done"] if row.cancel else []
        order += [] if all_ok else ["compensation_done"]
    history = {"order": order}
    for step in ("payment", "inventory", "shipping"):
        outcome = getattr(row, step)
        if outcome == NOT_CALLED:
            continue
        triggers = ["request", "succeed" if outcome == OK else "fail"]
        if step in row.compensated:
            triggers += ["compensate", "finish_compensation"]
        history[step] = triggers
    return history


@pytest.mark.parametrize("row", ROWS.values(), ids=ROWS.keys())
async def test_design_table_row(
    row: Row, store: Store, executor: Executor, downstream: Downstream
) -> None:
    balance, stock = (
        downstream.balance(row.user),
        downstream.stock(row.product) if row.product != MISSING else None,
    )

    order, _ = await store.create_order(
        user_id=row.user, product_id=row.product, quantity=row.quantity, owner=executor.owner
    )
    await executor.drive(order)
    if row.cancel:
        assert order.status == "completed"
        await executor.cancel(order.id)

    final = store.get(order.id)
    assert final.status == row.status
    assert final.lease_owner is None

    # The persisted history, scope by scope, with strictly increasing sequence numbers.
    log = store.history(order.id)
    assert [t.seq for t in log] == list(range(1, len(log) + 1))
    by_scope: dict[str, list[str]] = {}
    for t in log:
        by_scope.setdefault(t.scope, []).append(t.trigger)
    assert by_scope == expected_history(row)

    # Exactly the compensations the table demands were called, each applied once.
    effects = downstream.effects()
    compensation_keys = {
        k.split(":")[1]
        for k in effects
        if k.startswith(str(order.id)) and k.rsplit(":", 1)[1] in ("refund", "restore", "cancel")
    }
    assert compensation_keys == set(row.compensated)
    assert all(count == 1 for count in effects.values())
    if row.payment == NOT_CALLED:
        assert not [k for k in effects if k.startswith(str(order.id))]

    # Downstream state: money and stock move only for a completed (not cancelled) order.
    kept = row.status == "completed"
    assert downstream.balance(row.user) == balance - (final.amount or 0) * kept
    if stock is not None:
        assert downstream.stock(row.product) == stock - row.quantity * kept
    shipment = downstream.shipment(order.id)
    if row.shipping == OK:
        assert shipment is not None
        assert shipment["status"] == ("scheduled" if kept else "cancelled")
    else:
        assert shipment is None
    if kept:
        assert final.amount == row.quantity * downstream.get(f"/products/{row.product}")["price"]
        assert final.shipping_address and final.expected_delivery
