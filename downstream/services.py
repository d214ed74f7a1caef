"""HTTP routes of the four reference services: product, user, inventory, shipping.

Routes translate HTTP to `ledger.py` calls through `Store` and `FaultBoard`, nothing else.
Every POST honours `Idempotency-Key`; every operation listed in `faults.py` can be faulted.

The calls a saga makes (`DIRECT`) skip FastAPI's routing and parameter solving when
well-formed (`DirectCalls`): each call of an order pays them otherwise, about a third of
the services' CPU per call (BENCHMARKS.md, "serve's and the services' CPU per order").
"""

import re
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from downstream import ledger
from downstream.deps import MAX_KEY, FaultsDep, IdempotencyKey, StoreDep, respond
from downstream.faults import FaultBoard
from downstream.schemas import (
    MAX_INT,
    Charge,
    Detail,
    Refunded,
    Restored,
    ShipmentCancel,
    ShipmentRequest,
    StockMove,
    ValidationDetail,
)
from downstream.store import Outcome, Store

Direct = Callable[[Request, str], Awaitable[Response | None]]  # (request, path's last part)


class DirectCalls:
    """ASGI middleware, innermost of the services app: a saga's call (`DIRECT`: method and
    path) is read straight from the request, validated by the same pydantic model, and its
    endpoint called directly, before FastAPI's routing and parameter solving, which cost
    about a third of a call's CPU. It gives up (None) on anything it is not sure of and
    FastAPI then serves the request as it came (the body replayed): every 422, the OpenAPI,
    the endpoints' code and the error handling outside it stay FastAPI's."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        root: str = scope.get("root_path", "")  # mounted (serve's /services)
        if root and path.startswith(root):
            path = path[len(root) :]
        head, _, last = path.rpartition("/")
        method = scope["method"]
        reader = DIRECT.get((method, path)) or DIRECT.get((method, f"{head}/{{}}"))
        if reader is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        response = await reader(request, last)
        if response is not None:
            await response(scope, receive, send)
            return
        body = await request.body()  # read (or not) by the reader: FastAPI reads it again
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def _with_body(model: type[BaseModel], endpoint: Callable[..., Awaitable[Response]]) -> Direct:
    """A POST endpoint `(body, store, faults, key)`: a JSON body (`application/json`
    exactly) that `model` accepts, an `Idempotency-Key` within the header's bounds."""

    async def reader(request: Request, _: str) -> Response | None:
        headers = request.headers
        if headers.get("content-type") != "application/json":
            return None
        key = headers.get("idempotency-key")
        if key is not None and not 1 <= len(key) <= MAX_KEY:
            return None
        try:
            body = model.model_validate_json(await request.body())
        except ValidationError:
            return None
        state = request.app.state
        return await endpoint(body, state.store, state.faults, key)

    return reader


_DIGITS = re.compile(r"-?[0-9]{1,19}")


def _with_id(endpoint: Callable[..., Awaitable[Response]]) -> Direct:
    """A GET endpoint `(id, store, faults)` whose path ends in a plain decimal 64-bit
    integer."""

    async def reader(request: Request, raw: str) -> Response | None:
        if _DIGITS.fullmatch(raw) is None:
            return None
        value = int(raw)
        if not -MAX_INT - 1 <= value <= MAX_INT:
            return None
        state = request.app.state
        return await endpoint(value, state.store, state.faults)

    return reader


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
REFUNDED = "what the order was charged, given back; a no-op (0) if nothing, or no such user"
RESTORED = "what the order reserved, put back; a no-op (0) if nothing, or no such product"
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
    responses={
        200: {"model": Refunded, "description": REFUNDED},
        **answers(_422=INVALID, **FAULTS),
    },
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
    responses={
        200: {"model": Restored, "description": RESTORED},
        **answers(_422=INVALID, **FAULTS),
    },
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


# The calls of a saga (and their compensations) skip FastAPI's routing and parameter
# solving (`DirectCalls`): (method, path) -> reader; a path ending in an id with "{}" there.
DIRECT: dict[tuple[str, str], Direct] = {
    ("GET", "/products/{}"): _with_id(get_product),
    ("POST", "/users/deduct"): _with_body(Charge, deduct_balance),
    ("POST", "/users/refund"): _with_body(Charge, refund_balance),
    ("POST", "/inventory/deduct"): _with_body(StockMove, deduct_stock),
    ("POST", "/inventory/restore"): _with_body(StockMove, restore_stock),
    ("POST", "/shipping/schedule"): _with_body(ShipmentRequest, schedule_shipment),
    ("POST", "/shipping/cancel"): _with_body(ShipmentCancel, cancel_shipment),
}
