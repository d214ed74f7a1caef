"""HTTP routes of the four reference services: product, user, inventory, shipping.

Routes translate HTTP to `ledger.py` calls through `Store` and `FaultBoard`, nothing else.
Every POST honours `Idempotency-Key`; every operation listed in `faults.py` can be faulted.
"""

import sqlite3
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from downstream import ledger
from downstream.deps import FaultsDep, IdempotencyKey, StoreDep, respond
from downstream.faults import FaultBoard
from downstream.schemas import (
    MAX_INT,
    Charge,
    Detail,
    ShipmentCancel,
    ShipmentRequest,
    StockMove,
    ValidationDetail,
)
from downstream.store import Outcome, Store

router = APIRouter()

Id = Annotated[int, PathParam(ge=-MAX_INT - 1, le=MAX_INT, description="a 64-bit integer")]


def answers(**codes: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI documentation of a route's error answers: `answers(_404="no such user")`."""
    documented: dict[int | str, dict[str, Any]] = {}
    for name, description in codes.items():
        code = int(name.lstrip("_"))
        model = ValidationDetail if code == 422 else Detail
        documented[code] = {"model": model, "description": description}
    return documented


INVALID = "invalid body, or the Idempotency-Key was used for another request"
FAULTS = {"_500": "injected fault (/_faults: error, apply_then_error)", "_504": "injected timeout"}


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


@router.get(
    "/products/{product_id}",
    tags=["product"],
    responses=answers(_404="no such product", **FAULTS),
)
async def get_product(product_id: Id, store: StoreDep, faults: FaultsDep) -> JSONResponse:
    outcome = await faults.run(
        "product.get", lambda: store.read(lambda conn: ledger.get_product(conn, product_id))
    )
    return respond(outcome)


# ---- user (payment) ------------------------------------------------------------------------


@router.get("/users/{user_id}", tags=["user"], responses=answers(_404="no such user"))
async def get_user(user_id: Id, store: StoreDep) -> JSONResponse:
    return respond(store.read(lambda conn: ledger.get_user(conn, user_id)))


@router.post(
    "/users/deduct",
    tags=["user"],
    responses=answers(
        _402="insufficient balance",
        _404="no such user",
        _409="this order was already compensated (a late request)",
        _422=INVALID,
        **FAULTS,
    ),
)
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


@router.post(
    "/users/refund",
    tags=["user"],
    responses=answers(_404="no such user", _422=INVALID, **FAULTS),
)
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


@router.get(
    "/inventory/{product_id}", tags=["inventory"], responses=answers(_404="no such product")
)
async def get_stock(product_id: Id, store: StoreDep) -> JSONResponse:
    return respond(store.read(lambda conn: ledger.get_stock(conn, product_id)))


@router.post(
    "/inventory/deduct",
    tags=["inventory"],
    responses=answers(
        _404="no such product",
        _409="insufficient stock, or this order was already compensated",
        _422=INVALID,
        **FAULTS,
    ),
)
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


@router.post(
    "/inventory/restore",
    tags=["inventory"],
    responses=answers(_404="no such product", _422=INVALID, **FAULTS),
)
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


@router.post(
    "/shipping/schedule",
    tags=["shipping"],
    responses=answers(
        _409="already scheduled, or this order was already compensated",
        _422=INVALID + "; more than 10 units; no address for the user",
        **FAULTS,
    ),
)
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


@router.post("/shipping/cancel", tags=["shipping"], responses=answers(_422=INVALID, **FAULTS))
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
@router.get("/shipping/{order_id}", tags=["shipping"], responses=answers(_404="no shipment"))
async def get_shipment(order_id: str, store: StoreDep) -> JSONResponse:
    return respond(store.read(lambda conn: ledger.get_shipment(conn, order_id)))
