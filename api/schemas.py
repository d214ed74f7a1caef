"""The orchestrator's HTTP shapes: what clients send and what they get back."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.config import JsonDict

from fsm.bounds import MAX_ID
from fsm.machine import AUDIT_SCOPE, OrderState, Status, StepState
from fsm.models import STATE_COLUMN, Order, Transition
from fsm.outbox import order_document
from fsm.queries import Unreadable
from fsm.registry import STEP_NAMES
from fsm.why import Kind, Why

PositiveId = Annotated[int, Field(strict=True, gt=0, le=MAX_ID)]


_ID = "3f2b8c1e-9a7d-4e6f-8b0c-1d2e3f4a5b6c"
_AT = "2026-11-28T17:24:08.079000Z"


class OrderIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"user_id": 1, "product_id": 1, "quantity": 2}]},
    )

    user_id: PositiveId
    product_id: PositiveId
    quantity: Annotated[int, Field(strict=True, gt=0, le=10_000)]


class Shipping(BaseModel):
    address: str | None
    expected_delivery: str | None


_ORDER_EXAMPLE: JsonDict = {
    "id": _ID,
    "user_id": 1,
    "product_id": 1,
    "quantity": 2,
    "amount": 3998,
    "status": "completed",
    "state": "completed",
    "steps": dict.fromkeys(STEP_NAMES, "succeeded"),
    "shipping": {"address": "1 Main St, Springfield", "expected_delivery": "2026-12-01"},
    "attempts": {},
    "last_error": None,
    "attention_reason": None,
    "created_at": _AT,
    "updated_at": _AT,
}


class WhyOut(BaseModel):
    """Why a non-terminal order stands where it is (`fsm.why`): one kind, one sentence,
    and when it changes by itself."""

    kind: Kind
    summary: str
    until: datetime | None = Field(description="probe, next attempt, lease expiry or sweep")
    owner: str | None = Field(description="the lease holder")
    lease_expires_at: datetime | None
    service: str | None = Field(description="whose circuit breaker it waits on")
    call: str | None = Field(description="<step>:<action> of the call it waits to retry")
    failed_attempts: int | None
    max_attempts: int | None = Field(description="attempts per run")
    last_error: str | None
    reason: str | None = Field(description="why it is parked")
    interruptions: int | None = Field(
        default=None, description="held: how many times in a row its driver died under it"
    )

    @classmethod
    def of(cls, why: Why) -> WhyOut:
        return cls.model_validate(why, from_attributes=True)


class OrderOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [_ORDER_EXAMPLE]})

    id: uuid.UUID
    user_id: int
    product_id: int
    quantity: int
    amount: int | None = Field(description="cents: price x quantity, fixed at product lookup")
    status: Status
    state: OrderState = Field(description="the order machine's exact state")
    steps: dict[str, StepState] = Field(
        description="each step machine's state, by step (in the saga's order)",
        json_schema_extra={"propertyNames": {"enum": list(STEP_NAMES)}},
    )
    shipping: Shipping | None = Field(description="present once the order is completed")
    attempts: dict[str, int]
    last_error: str | None
    attention_reason: str | None = Field(
        description="why it is parked: only while the order is needs_attention"
    )
    created_at: datetime
    updated_at: datetime
    why: WhyOut | None = Field(
        default=None,
        description="GET /orders and GET /orders/{id}: why a non-terminal order stands "
        "where it is (the actions' answers leave it out)",
    )

    @classmethod
    def of(cls, order: Order, why: Why | None = None) -> OrderOut:
        # The same document the order's events carry (fsm.outbox): one shape, two channels.
        out = cls.model_validate(order_document(order))
        if why is not None:
            out.why = WhyOut.of(why)
        return out


class UnreadableOut(BaseModel):
    """A stored order the installed machine cannot read (a state it does not declare)."""

    id: uuid.UUID
    status: str = Field(description="the raw value in the row")
    state: str = Field(description="the raw value in the row")
    why: str
    created_at: datetime | None
    updated_at: datetime | None

    @classmethod
    def of(cls, row: Unreadable) -> UnreadableOut:
        return cls(
            id=row.id,
            status=row.status,
            state=row.state,
            why=row.why,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )


class OrderList(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "orders": [_ORDER_EXAMPLE],
                    "unreadable": [],
                    "total": 1,
                    "limit": 50,
                    "offset": 0,
                    "next_cursor": None,
                }
            ]
        }
    )

    orders: list[OrderOut]
    unreadable: list[UnreadableOut] = Field(
        description="rows of this page the installed machine cannot read, listed as such"
    )
    total: int = Field(description="how many orders match the filters in all")
    limit: int
    offset: int
    next_cursor: str | None = Field(description="pass as `cursor` for the next page")


_FIRST_STEP = STEP_NAMES[0]


def _state(scope: str, state: str) -> OrderState | StepState | str:
    """A logged state as the installed machine's, or as written: the log keeps the names
    an older machine used (README, "Upgrading the machine safely"): its history stays
    readable."""
    known = OrderState if scope in ("order", AUDIT_SCOPE) else StepState
    try:
        return known(state)
    except ValueError:
        return state


_LOGGED_STATE = (
    "order states (scope order or operator) or step states; a move made by an older "
    "machine (`machine_version`) keeps the name that machine used, which this one may no "
    "longer declare"
)


class TransitionOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "seq": 6,
                    "scope": _FIRST_STEP,
                    "trigger": "succeed",
                    "from_state": "requested",
                    "to_state": "succeeded",
                    "detail": {"order_id": _ID, "user_id": 1, "amount": 3998, "balance": 96002},
                    "created_at": _AT,
                    "machine_version": "174f5d6748eb",
                }
            ]
        }
    )

    seq: int
    scope: str = Field(
        description='"order", the step the transition belongs to, or "operator": an audit '
        "row naming who did an operator action and why (from = to: not a move; issue 17)",
        json_schema_extra={"enum": [*STATE_COLUMN, AUDIT_SCOPE]},
    )
    trigger: str
    from_state: OrderState | StepState | str = Field(description=_LOGGED_STATE)
    to_state: OrderState | StepState | str = Field(description=_LOGGED_STATE)
    detail: dict[str, Any] | None = Field(
        description="the service's answer, the error or the operator's reason; "
        '`{"unreadable": "<the stored text>"}` when that is not a JSON object'
    )
    created_at: datetime
    machine_version: str = Field(
        description="the machine that made the move (`GET /healthz` names the installed "
        "one; empty for moves logged before versions were recorded)"
    )

    @classmethod
    def of(cls, t: Transition) -> TransitionOut:
        return cls(
            seq=t.seq,
            scope=t.scope,
            trigger=t.trigger,
            from_state=_state(t.scope, t.from_state),
            to_state=_state(t.scope, t.to_state),
            detail=t.detail,
            created_at=t.created_at,
            machine_version=t.machine_version,
        )


class RejectedOrder(OrderOut):
    """The 404 of POST /orders: the product does not exist, the order stays queryable."""

    detail: str


def problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI documentation of the error answers a route can give (as problem+json:
    `api/openapi.py` moves them there)."""
    from api.problems import Problem  # FastAPI's: `order-saga orders --json` needs none of it

    described = {
        404: "no such order",
        409: "held by another driver, or not allowed in its state",
        500: "the stored order is corrupt",
    }
    return {code: {"model": Problem, "description": described[code]} for code in codes}
