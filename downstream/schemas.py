"""Request bodies of the reference services, validated strictly (bad input -> 422).

Integers are strict, positive and fit SQLite's 64 bits (money in cents, never a float);
unknown fields are ignored. Field names match the keyword arguments of `ledger.py`'s
functions.
"""

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from downstream.faults import Mode, Operation

MAX_INT = 2**63 - 1  # SQLite's INTEGER: a larger id or amount is a 422, not an overflow
PositiveInt = Annotated[int, Field(strict=True, gt=0, le=MAX_INT)]
MAX_FAULT_COUNT = 1000
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
    """`POST /_faults`: affect the next `count` calls of `operation` (strict: `seconds`
    is a number, never `false` or `"30"`)."""

    model_config = ConfigDict(extra="forbid")

    operation: Operation
    mode: Mode
    count: Annotated[int, Field(strict=True, gt=0, le=MAX_FAULT_COUNT)] = 1
    # The default depends on the mode (see faults.DEFAULT_SECONDS).
    seconds: Annotated[float, Field(strict=True, ge=0, le=3600, allow_inf_nan=False)] | None = None


# ---- answers of the compensations (documented in the OpenAPI) ------------------------------


class Refunded(BaseModel):
    """`POST /users/refund`: what this order got back. A user the service does not have is
    a successful no-op too: nothing can have been charged to it."""

    user_id: int
    order_id: str
    refunded: int = Field(description="cents given back: 0 when nothing was charged")
    balance: int | None = Field(description="the user's balance after; null: no such user")


class Restored(BaseModel):
    """`POST /inventory/restore`: what this order put back. A product the service does not
    stock is a successful no-op too: nothing can have been reserved."""

    product_id: int
    order_id: str
    restored: int = Field(description="units put back: 0 when nothing was reserved")
    remaining: int | None = Field(description="the stock after; null: no such product")


# ---- error answers (documented in the OpenAPI) ---------------------------------------------


class Detail(BaseModel):
    """Every error answer of the services: `{"detail": "..."}`."""

    detail: str


class Issue(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationDetail(BaseModel):
    """A 422: what is wrong and where, never the input itself (it may not be printable)."""

    detail: list[Issue] | str
