"""HTTP routes of the four reference services: product, user, inventory, shipping.

Routes translate HTTP to `ledger.py` calls through `Store` and `FaultBoard`, nothing else.
Every POST honours `Idempotency-Key`; every operation listed in `faults.py` can be faulted.
"""

import sqlite3
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from downstream import ledger
from downstream.deps import FaultsDep, IdempotencyKey, StoreDep, respond
from downstream.faults import FaultBoard
from downstream.schemas import Charge, ShipmentCancel, ShipmentRequest, StockMove
from downstream.store import Outcome, Store

router = APIRouter()


async def _mutate(
    *,
    store: Store,
    faults: FaultBoard,
    key: str | None,
    operation: str,
    body: BaseModel,
    action: Callable[..., Outcome],
) -> JSONResponse:
    request: dict[str, Any] = body.model_dump()

    def call() -> Outcome:
        def apply(conn: sqlite3.Connection) -> Outcome:
            return action(conn, **request)

        return store.mutate(key=key, operation=operation, request=request, action=apply)

    return respond(await faults.run(operation, call))


# ---- product -------------------------------------------------------------------------------


@router.get("/products/{product_id}", tags=["product"])
async def get_product(product_id: int, store: StoreDep, faults: FaultsDep) -> JSONResponse:
    outcome = await faults.run(
        "product.get", lambda: store.read(lambda conn: ledger.get_product(conn, product_id))
    )
    return respond(outcome)


# ---- user (payment) ------------------------------------------------------------------------


@router.get("/users/{user_id}", tags=["user"])
async def get_user(user_id: int, store: StoreDep) -> JSONResponse:
    return respond(store.read(lambda conn: ledger.get_user(conn, user_id)))


@router.post("/users/deduct", tags=["user"])
async def deduct_balance(
    body: Charge, store: StoreDep, faults: FaultsDep, key: IdempotencyKey = None
) -> JSONResponse:
    return await _mutate(
        store=store,
        faults=faults,
        key=key,
        operation="user.deduct",
        body=body,
        action=ledger.deduct_balance,
    )


@router.post("/users/refund", tags=["user"])
async def refund_balance(
    body: Charge, store: StoreDep, faults: FaultsDep, key: IdempotencyKey = None
) -> JSONResponse:
    return await _mutate(
        store=store,
        faults=faults,
        key=key,
        operation="user.refund",
        body=body,
        action=ledger.refund_balance,
    )


# ---- inventory -----------------------------------------------------------------------------


@router.get("/inventory/{product_id}", tags=["inventory"])
async def get_stock(product_id: int, store: StoreDep) -> JSONResponse:
    return respond(store.read(lambda conn: ledger.get_stock(conn, product_id)))


@router.post("/inventory/deduct", tags=["inventory"])
async def deduct_stock(
    body: StockMove, store: StoreDep, faults: FaultsDep, key: IdempotencyKey = None
) -> JSONResponse:
    return await _mutate(
        store=store,
        faults=faults,
        key=key,
        operation="inventory.deduct",
        body=body,
        action=ledger.deduct_stock,
    )


@router.post("/inventory/restore", tags=["inventory"])
async def restore_stock(
    body: StockMove, store: StoreDep, faults: FaultsDep, key: IdempotencyKey = None
) -> JSONResponse:
    return await _mutate(
        store=store,
        faults=faults,
        key=key,
        operation="inventory.restore",
        body=body,
        action=ledger.restore_stock,
    )


# ---- shipping ------------------------------------------------------------------------------


@router.post("/shipping/schedule", tags=["shipping"])
async def schedule_shipment(
    body: ShipmentRequest, store: StoreDep, faults: FaultsDep, key: IdempotencyKey = None
) -> JSONResponse:
    return await _mutate(
        store=store,
        faults=faults,
        key=key,
        operation="shipping.schedule",
        body=body,
        action=ledger.schedule_shipment,
    )


@router.post("/shipping/cancel", tags=["shipping"])
async def cancel_shipment(
    body: ShipmentCancel, store: StoreDep, faults: FaultsDep, key: IdempotencyKey = None
) -> JSONResponse:
    return await _mutate(
        store=store,
        faults=faults,
        key=key,
        operation="shipping.cancel",
        body=body,
        action=ledger.cancel_shipment,
    )


# Declared after /shipping/schedule and /shipping/cancel (POST-only, so no clash anyway).
@router.get("/shipping/{order_id}", tags=["shipping"])
async def get_shipment(order_id: str, store: StoreDep) -> JSONResponse:
    return respond(store.read(lambda conn: ledger.get_shipment(conn, order_id)))
