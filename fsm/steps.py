"""The steps' adapters (their rows are `fsm.registry.STEPS`), each pairing its forward call
with its compensation (as Temporal's saga pairs an activity with its undo), typed against
the service Protocols.

The executor asks a step to `forward` or `undo` for an order and gets the service's answer
plus the order columns that answer sets; it never picks a client method by name.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Protocol

from fsm.bounds import MAX_ADDRESS_CHARS, MAX_DELIVERY_CHARS
from fsm.clients import Answer, InventoryService, ReconcilingService, ShippingService, UserService


class Order(Protocol):
    """What an adapter reads of an order (`fsm.models.Order`; no import of it, so the
    registry, which the models read, stays below them)."""

    id: uuid.UUID
    user_id: int
    product_id: int
    quantity: int
    amount: int | None


def idempotency_key(order: Order, step: str, action: str) -> str:
    """Derived, never random: every retry, resume and process sends the same key."""
    return f"{order.id}:{step}:{action}"


class SagaStep(Protocol):
    """One step: its forward call and its undo (their names: the step's `fsm.registry` row)."""

    @property
    def service(self) -> ReconcilingService: ...

    async def forward(self, order: Order, key: str) -> Answer: ...

    async def undo(self, order: Order, key: str) -> Answer: ...

    def forward_changes(self, answer: Answer) -> dict[str, Any]: ...

    def undo_changes(self) -> dict[str, Any]: ...


class _NoChanges:
    def forward_changes(self, answer: Answer) -> dict[str, Any]:
        return {}

    def undo_changes(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class Payment(_NoChanges):
    """Charge the user the order's amount; refund it."""

    service: UserService

    async def forward(self, order: Order, key: str) -> Answer:
        return await self.service.deduct(
            user_id=order.user_id, amount=order.amount or 0, order_id=str(order.id), key=key
        )

    async def undo(self, order: Order, key: str) -> Answer:
        return await self.service.refund(
            user_id=order.user_id, amount=order.amount or 0, order_id=str(order.id), key=key
        )


@dataclass(frozen=True)
class Inventory(_NoChanges):
    """Take the ordered quantity out of stock; put it back."""

    service: InventoryService

    async def forward(self, order: Order, key: str) -> Answer:
        return await self.service.deduct(
            product_id=order.product_id, quantity=order.quantity, order_id=str(order.id), key=key
        )

    async def undo(self, order: Order, key: str) -> Answer:
        return await self.service.restore(
            product_id=order.product_id, quantity=order.quantity, order_id=str(order.id), key=key
        )


def _text(value: Any, width: int) -> str | None:
    return value[:width] if isinstance(value, str) else None


@dataclass(frozen=True)
class Shipping:
    """Schedule the shipment (its address and delivery date, when strings, land on the
    order); cancel it."""

    service: ShippingService

    async def forward(self, order: Order, key: str) -> Answer:
        return await self.service.schedule(
            order_id=str(order.id), user_id=order.user_id, quantity=order.quantity, key=key
        )

    async def undo(self, order: Order, key: str) -> Answer:
        return await self.service.cancel(order_id=str(order.id), key=key)

    def forward_changes(self, answer: Answer) -> dict[str, Any]:
        """The answer's address and delivery date for the order's typed columns: a string
        cut to the column's width, anything else (an object, a number) None; the whole
        answer stays in the step's transition detail."""
        return {
            "shipping_address": _text(answer.get("address"), MAX_ADDRESS_CHARS),
            "expected_delivery": _text(answer.get("expected_delivery"), MAX_DELIVERY_CHARS),
        }

    def undo_changes(self) -> dict[str, Any]:
        return {"shipping_address": None, "expected_delivery": None}
