"""Request bodies of the reference services, validated strictly (bad input -> 422).

Integers are strict and positive (money in cents, never a float); unknown fields are ignored.
Field names match the keyword arguments of `ledger.py`'s functions.
"""

from typing import Annotated

from pydantic import BaseModel, Field

from downstream.faults import Mode, Operation

PositiveInt = Annotated[int, Field(strict=True, gt=0)]
OrderId = Annotated[str, Field(strict=True, min_length=1, max_length=200)]


class Charge(BaseModel):
    """`POST /users/deduct` and `POST /users/refund`."""

    user_id: PositiveInt
    amount: PositiveInt
    order_id: OrderId


class StockMove(BaseModel):
    """`POST /inventory/deduct` and `POST /inventory/restore`."""

    product_id: PositiveInt
    quantity: PositiveInt
    order_id: OrderId


class ShipmentRequest(BaseModel):
    """`POST /shipping/schedule` (more than 10 units is a business 422, not a schema one)."""

    order_id: OrderId
    user_id: PositiveInt
    quantity: PositiveInt


class ShipmentCancel(BaseModel):
    """`POST /shipping/cancel`."""

    order_id: OrderId


class FaultRequest(BaseModel):
    """`POST /_faults`: affect the next `count` calls of `operation`."""

    operation: Operation
    mode: Mode
    count: PositiveInt = 1
    seconds: Annotated[float, Field(ge=0, le=3600)] | None = None  # default depends on mode
