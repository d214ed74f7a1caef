"""Order endpoints: translate HTTP to store/executor calls and back, nothing else."""

from __future__ import annotations

import re
import uuid
from collections.abc import Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from api import direct
from api.auth import principal_of
from api.deps import ExecutorDep, PrincipalDep, SettingsDep, StoreDep, may_see, visible
from api.runner import Runner
from api.schemas import (
    OrderIn,
    OrderList,
    OrderOut,
    RejectedOrder,
    TransitionOut,
    UnreadableOut,
    problems,
)
from fsm import queries, why
from fsm.bounds import MAX_ID, MAX_SECONDS
from fsm.errors import CircuitOpen, LeaseLost
from fsm.machine import TERMINAL_ORDER_STATES, OperatorAction, OrderState, Status, is_terminal
from fsm.models import Order
from fsm.operator import Audit

router = APIRouter(prefix="/orders", tags=["orders"], route_class=direct.DirectRoute)

# Visible ASCII, inner spaces allowed: an empty or blank key would be one key shared by
# every client (the second would get the first one's order).
_KEY_PATTERN = r"^[!-~]([ -~]*[!-~])?$"
_KEY = re.compile(_KEY_PATTERN.strip("^$"))  # for fullmatch: Python's $ allows a final \n
_KEY_MAX = 200
IdempotencyKey = Annotated[
    str | None,
    Header(
        min_length=1,
        max_length=_KEY_MAX,
        pattern=_KEY_PATTERN,
        description="1-200 visible ASCII characters; a retry with the same key and body "
        "returns the same order",
    ),
]

Reason = Annotated[
    str | None,
    Query(max_length=1000, description="why (kept in the order's transition log)"),
]

# Every end the machine declares (resolved included: a replay of an order an operator
# ended is finished, not "still running"); rejected answers 404 before this is asked.
_FINISHED = frozenset(state.value for state in TERMINAL_ORDER_STATES)
_JSON = "application/json"


def _answer(order: Order) -> Response:
    """201 when terminal, 404 (still naming the order) when rejected, 202 while running.
    The body is serialized once, by pydantic's own JSON serializer (no dict in between)."""
    out = OrderOut.of(order)
    if order.status == Status.REJECTED:
        body: dict[str, Any] = out.model_dump(mode="json")
        body["detail"] = f"product {order.product_id} not found"
        return JSONResponse(body, status_code=status.HTTP_404_NOT_FOUND)
    if order.state in _FINISHED:
        json = out.__pydantic_serializer__.to_json(out)
        return Response(json, status_code=status.HTTP_201_CREATED, media_type=_JSON)
    return _accepted(out)


def _accepted(out: OrderOut) -> Response:
    """202 + Location: the order's run goes on in the background (api.runner)."""
    return Response(
        out.__pydantic_serializer__.to_json(out),
        status_code=status.HTTP_202_ACCEPTED,
        media_type=_JSON,
        headers={"Location": f"/orders/{out.id}"},
    )


def _respond_async(prefer: str | None) -> bool:
    """`Prefer: respond-async` (RFC 7240): answer 202 at once, without waiting for the run."""
    return prefer is not None and "respond-async" in prefer.lower()


Prefer = Annotated[
    str | None,
    Header(description="`respond-async`: answer 202 + Location at once, the run goes on"),
]


def _still_running(description: str) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI entry of a 202: the order so far, where to follow it, and whether
    `Prefer: respond-async` was honoured."""
    return {
        202: {
            "model": OrderOut,
            "description": description,
            "headers": {
                "Location": {
                    "description": "the order: /orders/{id}",
                    "required": True,
                    "schema": {"type": "string"},
                },
                "Preference-Applied": {
                    "description": "`respond-async` when the request's `Prefer: "
                    "respond-async` was honoured (RFC 7240)",
                    "schema": {"type": "string"},
                },
            },
        }
    }


_RUN_GOES_ON = _still_running(
    "the run is still going after RESPOND_WITHIN (or `Prefer: respond-async`): it goes on in "
    "the background; follow Location"
)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=OrderOut,
    responses={
        **_still_running("still running (see Location)"),
        404: {"model": RejectedOrder, "description": "the product does not exist"},
        503: {"description": "the product service's circuit breaker is open (see Retry-After)"},
    },
)
async def create_order(
    body: OrderIn,
    request: Request,
    store: StoreDep,
    executor: ExecutorDep,
    principal: PrincipalDep,
    idempotency_key: IdempotencyKey = None,
    prefer: Annotated[str | None, Header()] = None,
) -> Response:
    """Place an order and run the saga: product lookup, then payment, inventory and
    shipping concurrently, compensating what succeeded if any fails. A retried POST with
    the same `Idempotency-Key` returns the same order and charges nothing twice."""
    try:
        request.app.state.breakers.check("product.get")  # 503 + Retry-After, nothing created
    except CircuitOpen:
        # A retry of an order placed already needs no product lookup: answered from it.
        # Looked up only here (the insert below finds the key itself, atomically).
        known = None
        if idempotency_key is not None:
            known = await run_in_threadpool(
                store.find_by_idempotency_key, idempotency_key, created_by=principal.creator
            )
        if known is None:
            raise
        return _replay(known, body, idempotency_key)
    order, created = await store.create_order(
        user_id=body.user_id,
        product_id=body.product_id,
        quantity=body.quantity,
        idempotency_key=idempotency_key,
        owner=executor.owner,
        created_by=principal.creator,
    )
    if not created:
        return _replay(order, body, idempotency_key)
    runner: Runner = request.app.state.runner
    task = runner.start(order)
    asynchronous = _respond_async(prefer)
    if not asynchronous:
        await runner.within(task)  # else still running in the background: answer 202
    answer = _answer(order)
    if asynchronous:  # RFC 7240 §3: say the preference was honoured
        answer.headers["Preference-Applied"] = "respond-async"
    return answer


def _replay(order: Order, body: OrderIn, idempotency_key: str | None) -> Response:
    """The answer to a retried POST whose key has an order already: that order, or 422
    when the key was used for a different one."""
    same = (order.user_id, order.product_id, order.quantity) == (
        body.user_id,
        body.product_id,
        body.quantity,
    )
    if not same:  # the shape of any other 422, so clients handle one error format
        raise RequestValidationError(
            [
                {
                    "type": "idempotency_key_reused",
                    "loc": ["header", "Idempotency-Key"],
                    "msg": "Idempotency-Key was already used for a different order",
                    "input": idempotency_key,
                }
            ]
        )
    return _answer(order)


async def _create_order_directly(request: Request) -> Response | None:
    """`create_order` for a well-formed request (`api.direct`): a JSON body (declared
    `application/json` exactly) that `OrderIn` accepts, a valid `Idempotency-Key` or none."""
    headers = request.headers
    if headers.get("content-type") != _JSON:
        return None
    key = headers.get("idempotency-key")
    if key is not None and (len(key) > _KEY_MAX or _KEY.fullmatch(key) is None):
        return None
    try:
        body = OrderIn.model_validate_json(await request.body())
    except ValidationError:
        return None
    state = request.app.state
    return await create_order(
        body,
        request,
        state.store,
        state.executor,
        principal_of(request.scope),
        key,
        headers.get("prefer"),
    )


direct.register(create_order, _create_order_directly)


# GET /orders' query parameters: each takes one value (FastAPI keeps the last of several).
LIST_PARAMETERS = (
    "status",
    "state",
    "user_id",
    "product_id",
    "unmoved_for",
    "id_prefix",
    "limit",
    "offset",
    "cursor",
)


def _one_each(request: Request) -> None:
    """422 for a parameter given twice (`?status=completed&status=failed` read as the last
    alone would list only failed ones) and for a cursor with an offset (which a cursor
    replaces)."""
    query = request.query_params
    for name in LIST_PARAMETERS:
        given = query.getlist(name)
        if len(given) > 1:
            why = ValueError(f"{name} given {len(given)} times: give it once")
            raise _bad_query(name, why, ", ".join(given))
    if "cursor" in query and "offset" in query:
        raise _bad_query("offset", ValueError("offset cannot be used with cursor"), query["offset"])


@router.get("", response_model=OrderList, responses=problems(500))
def list_orders(
    request: Request,
    store: StoreDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    status_: Annotated[Status | None, Query(alias="status")] = None,
    state: Annotated[OrderState | None, Query(description="the exact machine state")] = None,
    user_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    product_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    unmoved_for: Annotated[
        float | None, Query(ge=0, le=MAX_SECONDS, description="seconds since the order last moved")
    ] = None,
    id_prefix: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=36,
            pattern=r"^[0-9a-fA-F-]+$",
            description="the start of an order id (8 hex digits are usually enough)",
        ),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
    cursor: Annotated[
        str | None, Query(max_length=200, description="`next_cursor` of the previous page")
    ] = None,
) -> OrderList:
    """Orders, newest first, filtered by every parameter given; `total` counts all that
    match, `next_cursor` fetches the next page (stable while orders arrive; `offset` works
    too). A stored row the installed machine cannot read is listed under `unreadable`.
    A client key lists the orders it placed, only those. Each live one carries its `why`
    (one query for the page's attempts, as the console's list). Each parameter is given
    once; `cursor` and `offset` not together."""
    _one_each(request)
    mine = principal.creator if principal.sees_only_own else None
    flt = queries.OrderFilter(
        status=status_,
        state=state,
        user_id=user_id,
        product_id=product_id,
        older_than=unmoved_for,
        id_prefix=id_prefix,
        limit=limit,
        offset=offset,
        cursor=cursor,
        created_by=mine,
    )
    try:
        page = queries.list_orders(store, flt)
    except queries.BadCursor as exc:  # a cursor this API did not hand out
        raise _bad_query("cursor", exc, cursor) from None
    except queries.BadIdPrefix as exc:  # dashes alone: no hex digit to match
        raise _bad_query("id_prefix", exc, id_prefix) from None
    whys = why.for_orders(store, page.orders, settings)
    return OrderList(
        orders=[OrderOut.of(o, whys.get(o.id)) for o in page.orders],
        unreadable=[UnreadableOut.of(u) for u in page.unreadable],
        total=page.total,
        limit=limit,
        offset=0 if cursor else offset,
        next_cursor=page.next_cursor,
    )


def _bad_query(name: str, exc: ValueError, value: str | None) -> RequestValidationError:
    """The 422 of a query parameter the route's own validation let through."""
    return RequestValidationError(
        [{"type": "value_error", "loc": ["query", name], "msg": str(exc), "input": value}]
    )


@router.get("/{order_id}", response_model=OrderOut, responses=problems(404, 500))
def get_order(
    order_id: uuid.UUID, store: StoreDep, principal: PrincipalDep, settings: SettingsDep
) -> OrderOut:
    """One order: coarse status, exact machine state, each step's state, retry info, and
    `why` a non-terminal one stands where it is (breaker, lease, next attempt, parked)."""
    order = visible(store, order_id, principal)
    return OrderOut.of(order, why.for_order(store, order, settings))


@router.get(
    "/{order_id}/transitions", response_model=list[TransitionOut], responses=problems(404, 500)
)
def get_transitions(
    order_id: uuid.UUID, store: StoreDep, principal: PrincipalDep
) -> list[TransitionOut]:
    """The order's append-only transition log, oldest first: every committed move with
    the downstream answer, error or operator's reason in `detail`, and every operator
    action as its own row (scope `operator`, from = to) naming who did it and why. An
    order whose row cannot be decoded still has its log served (as the console does)."""
    may_see(store, order_id, principal)  # 404 for an unknown order, not an empty list
    return [TransitionOut.of(t) for t in store.history(order_id)]


@router.post(
    "/{order_id}/resume",
    response_model=OrderOut,
    responses=_RUN_GOES_ON | problems(404, 409, 500),
)
async def resume_order(
    order_id: uuid.UUID,
    request: Request,
    executor: ExecutorDep,
    principal: PrincipalDep,
    reason: Reason = None,
    prefer: Prefer = None,
) -> Response | OrderOut:
    """Drive the order on from its persisted state now (a parked order retries its
    compensation); a terminal order is returned unchanged. The log names who resumed.
    200 with the order once this run has ended (a compensation still failing, or waiting
    on an open circuit breaker longer than the run's retry budget: `needs_attention`);
    202 + Location if it runs longer than RESPOND_WITHIN: it goes on in the background."""
    audit = Audit(OperatorAction.RESUME, principal.audit, reason)
    order, run = await executor.prepare_run(order_id, audit=audit)
    return await _ran(request, order, run, prefer)


@router.post(
    "/{order_id}/cancel",
    response_model=OrderOut,
    responses=_RUN_GOES_ON | problems(404, 409, 500),
)
async def cancel_order(
    order_id: uuid.UUID,
    request: Request,
    store: StoreDep,
    executor: ExecutorDep,
    principal: PrincipalDep,
    reason: Reason = None,
    prefer: Prefer = None,
) -> Response | OrderOut:
    """Cancel a completed order: refund the user, restore the stock, cancel the shipment.
    A client key may cancel the orders it placed; the log names who cancelled. 200 once
    the run has ended (`cancelled`, or `needs_attention` when a compensation still fails),
    202 + Location if it runs longer than RESPOND_WITHIN: it goes on in the background."""
    if principal.sees_only_own:
        visible(store, order_id, principal)
    audit = Audit(OperatorAction.CANCEL, principal.audit, reason)
    try:
        order, run = await executor.prepare_cancel(order_id, audit=audit)
    except LeaseLost:
        # Its cancellation already under way (this cancel's own retry, say, while the
        # first goes on in the background): that is what was asked, so 202 + Location as
        # the first one's answer, not a 409 telling the client it conflicted.
        now = await run_in_threadpool(store.get, order_id)  # off the event loop, as above
        if not now.cancel_requested:
            raise
        if is_terminal(now.state):  # ended while the first run gave its lease back
            return OrderOut.of(now)
        return _accepted(OrderOut.of(now))
    return await _ran(request, order, run, prefer)


async def _ran(
    request: Request, order: Order, run: Coroutine[Any, Any, Order], prefer: str | None
) -> Response | OrderOut:
    """An action's run, in the background as POST /orders' (api.runner): its order once it
    ends within RESPOND_WITHIN (or the error it ended with), else 202 + Location."""
    runner: Runner = request.app.state.runner
    task = runner.adopt(order, run)
    asynchronous = _respond_async(prefer)
    if not asynchronous and await runner.within(task):
        return OrderOut.of(task.result())
    answer = _accepted(OrderOut.of(order))
    if asynchronous:  # RFC 7240 §3, as POST /orders
        answer.headers["Preference-Applied"] = "respond-async"
    return answer
