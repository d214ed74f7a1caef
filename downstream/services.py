"""HTTP routes of the four reference services: product, user, inventory, shipping.

Routes translate HTTP to `ledger.py` calls through `Store` and `FaultBoard`, nothing else.
Every POST honours `Idempotency-Key`; every operation listed in `faults.py` can be faulted.

The calls a saga makes (`@direct`) skip FastAPI's parameter solving when well-formed
(`DirectRoute`): each call of an order pays it otherwise, about a third of the services'
CPU per call (BENCHMARKS.md, "serve's and the services' CPU per order").
"""

import re
import sqlite3
from collections.abc import Awaitable, Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError

from downstream import ledger
from downstream.deps import MAX_KEY, FaultsDep, IdempotencyKey, StoreDep, respond
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

Direct = Callable[[Request], Awaitable[Response | None]]
_DIRECT: dict[Callable[..., Any], Direct] = {}  # endpoint -> its reader (end of module)


class DirectRoute(APIRoute):
    """A route whose endpoint may have a direct reader (`_DIRECT`): it takes the request's
    parameters straight from the request, validated by the same pydantic model, and calls
    the endpoint itself. It gives up (None) on anything it is not sure of, and FastAPI's
    own handler then serves the request: every 422, the OpenAPI and the endpoint's code
    stay FastAPI's."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        checked = super().get_route_handler()
        endpoint = self.endpoint

        async def handler(request: Request) -> Response:
            reader = _DIRECT.get(endpoint)
            if reader is not None and (response := await reader(request)) is not None:
                return response
            return await checked(request)

        return handler


def _with_body(model: type[BaseModel], endpoint: Callable[..., Awaitable[Response]]) -> Direct:
    """A POST endpoint `(body, store, faults, key)`: a JSON body (`application/json`
    exactly) that `model` accepts, an `Idempotency-Key` within the header's bounds."""

    async def reader(request: Request) -> Response | None:
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


def _with_id(name: str, endpoint: Callable[..., Awaitable[Response]]) -> Direct:
    """A GET endpoint `(id, store, faults)` whose path parameter `name` is a plain decimal
    64-bit integer."""

    async def reader(request: Request) -> Response | None:
        raw = request.path_params.get(name)
        if not isinstance(raw, str) or _DIGITS.fullmatch(raw) is None:
            return None
        value = int(raw)
        if not -MAX_INT - 1 <= value <= MAX_INT:
            return None
        state = request.app.state
        return await endpoint(value, state.store, state.faults)

    return reader


router = APIRouter(route_class=DirectRoute)

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


# The calls of a saga (and their compensations) skip FastAPI's parameter solving.
_DIRECT.update(
    {
        get_product: _with_id("product_id", get_product),
        deduct_balance: _with_body(Charge, deduct_balance),
        refund_balance: _with_body(Charge, refund_balance),
        deduct_stock: _with_body(StockMove, deduct_stock),
        restore_stock: _with_body(StockMove, restore_stock),
        schedule_shipment: _with_body(ShipmentRequest, schedule_shipment),
        cancel_shipment: _with_body(ShipmentCancel, cancel_shipment),
    }
)
