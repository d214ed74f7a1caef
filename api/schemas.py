"""The orchestrator's HTTP shapes: what clients send and what they get back."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from api.problems import Problem
from fsm.machine import Status
from fsm.models import Order, Transition
from fsm.store import step_states

PositiveId = Annotated[int, Field(strict=True, gt=0, le=2**31 - 1)]


class OrderIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: PositiveId
    product_id: PositiveId
    quantity: Annotated[int, Field(strict=True, gt=0, le=10_000)]


class Shipping(BaseModel):
    address: str | None
    expected_delivery: str | None


class OrderOut(BaseModel):
    id: uuid.UUID
    user_id: int
    product_id: int
    quantity: int
    amount: int | None = Field(description="cents: price x quantity, fixed at product lookup")
    status: Status
    state: str
    steps: dict[str, str]
    shipping: Shipping | None = Field(description="present once the order is completed")
    attempts: dict[str, int]
    last_error: str | None
    attention_reason: str | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, order: Order) -> OrderOut:
        shipping = None
        if order.status == Status.COMPLETED:
            shipping = Shipping(
                address=order.shipping_address, expected_delivery=order.expected_delivery
            )
        return cls(
            id=order.id,
            user_id=order.user_id,
            product_id=order.product_id,
            quantity=order.quantity,
            amount=order.amount,
            status=Status(order.status),
            state=order.state,
            steps=step_states(order),
            shipping=shipping,
            attempts=order.attempts,
            last_error=order.last_error,
            attention_reason=order.attention_reason,
            created_at=order.created_at,
            updated_at=order.updated_at,
        )


class OrderList(BaseModel):
    orders: list[OrderOut]
    limit: int
    offset: int


class TransitionOut(BaseModel):
    seq: int
    scope: str
    trigger: str
    from_state: str
    to_state: str
    detail: dict[str, Any] | None
    created_at: datetime

    @classmethod
    def of(cls, t: Transition) -> TransitionOut:
        return cls(
            seq=t.seq,
            scope=t.scope,
            trigger=t.trigger,
            from_state=t.from_state,
            to_state=t.to_state,
            detail=t.detail,
            created_at=t.created_at,
        )


class RejectedOrder(OrderOut):
    """The 404 of POST /orders: the product does not exist, the order stays queryable."""

    detail: str


def problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI documentation of the error answers a route can give (as problem+json:
    `api/openapi.py` moves them there)."""
    described = {
        404: "no such order",
        409: "held by another driver, or not allowed in its state",
        500: "the stored order is corrupt",
    }
    return {code: {"model": Problem, "description": described[code]} for code in codes}
