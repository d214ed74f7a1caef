"""SPEC §1, row by row (every row of fsm.machine.DESIGN_TABLE, plus the rejected and the
cancelled order): the final status, the exact compensations, the persisted history
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
from fsm.machine import DESIGN_TABLE, Outcome
from fsm.registry import STEP, STEP_NAMES
from fsm.store import Store
from tests.support.services import Downstream

STEPS = list(STEP_NAMES)
UNDO_ACTIONS = {row.undo for row in STEP.values()}

OK, NO, NOT_CALLED = "ok", "failed", "not called"


@dataclass(frozen=True)
class Row:
    user: int
    product: int
    quantity: int
    outcomes: dict[str, str]  # step -> OK, NO or NOT_CALLED
    status: str
    compensated: frozenset[str] = field(default_factory=frozenset)
    cancel: bool = False


# The seed's named ids (downstream/seed.py); more than MAX_UNITS_PER_SHIPMENT cannot ship.
PAYS, POOR, WIDGET = ORDINARY_USER_ID, POOR_USER_ID, WIDGET_ID
SOLD_OUT, MISSING, TOO_MANY = SOLD_OUT_PRODUCT_ID, MISSING_PRODUCT_ID, MAX_UNITS_PER_SHIPMENT + 1
# How the reference services are made to say "no" to one step: the order's field and value.
FAILS = {
    "payment": ("user", POOR),
    "inventory": ("product", SOLD_OUT),
    "shipping": ("quantity", TOO_MANY),
}
ORDINARY = {"user": PAYS, "product": WIDGET, "quantity": 1}


def design_row(outcomes: tuple[Outcome, ...]) -> Row:
    """fsm.machine.DESIGN_TABLE's row for these outcomes, as an order to place."""
    status, compensated = DESIGN_TABLE[outcomes]
    order = dict(ORDINARY)
    for step, outcome in zip(STEP_NAMES, outcomes, strict=True):
        if outcome is Outcome.FAILED:
            field_, value = FAILS[step]
            order[field_] = value
    return Row(
        **order,
        outcomes={
            s: OK if o is Outcome.SUCCESS else NO for s, o in zip(STEP_NAMES, outcomes, strict=True)
        },
        status=status.value,
        compensated=frozenset(compensated),
    )


def row_id(outcomes: tuple[Outcome, ...]) -> str:
    failed = [s for s, o in zip(STEP_NAMES, outcomes, strict=True) if o is Outcome.FAILED]
    return "-".join(failed) + "-failed" if failed else "completed"


ROWS = {row_id(outcomes): design_row(outcomes) for outcomes in DESIGN_TABLE}
ROWS |= {
    # row 2: 404 | not called | not called | not called -> rejected, call nothing else
    "rejected": Row(PAYS, MISSING, 1, dict.fromkeys(STEPS, NOT_CALLED), "rejected"),
    # cancellation: a completed order cancelled by its owner -> undo every step
    "cancelled": Row(
        PAYS, WIDGET, 2, dict.fromkeys(STEPS, OK), "cancelled", frozenset(STEPS), cancel=True
    ),
}


def expected_history(row: Row) -> dict[str, list[str]]:
    """Each scope's triggers in commit order (steps interleave, so compare per scope)."""
    order = ["request_product"]
    if row.status == "rejected":
        order.append("product_missing")
    else:
        order.append("product_found")
        all_ok = all(outcome == OK for outcome in row.outcomes.values())
        order.append("all_succeeded" if all_ok else "some_failed")
        order += ["cancel", "cancellation_done"] if row.cancel else []
        order += [] if all_ok else ["compensation_done"]
    history = {"order": order}
    for step, outcome in row.outcomes.items():
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
        if k.startswith(str(order.id)) and k.rsplit(":", 1)[1] in UNDO_ACTIONS
    }
    assert compensation_keys == set(row.compensated)
    assert all(count == 1 for count in effects.values())
    if row.status == "rejected":
        assert not [k for k in effects if k.startswith(str(order.id))]

    # Downstream state: money and stock move only for a completed (not cancelled) order.
    kept = row.status == "completed"
    assert downstream.balance(row.user) == balance - (final.amount or 0) * kept
    if stock is not None:
        assert downstream.stock(row.product) == stock - row.quantity * kept
    shipment = downstream.shipment(order.id)
    if row.outcomes["shipping"] == OK:
        assert shipment is not None
        assert shipment["status"] == ("scheduled" if kept else "cancelled")
    else:
        assert shipment is None
    if kept:
        assert final.amount == row.quantity * downstream.get(f"/products/{row.product}")["price"]
        assert final.shipping_address and final.expected_delivery
