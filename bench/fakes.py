"""In-process fake downstream services behind the `fsm.clients.Services` protocol: dicts,
no HTTP, instant answers, so a figure measured with them is the engine's own cost.

They follow the reference services' rules where the benchmark saga can reach them: a
product lookup (404 for an unknown id), balance and stock checks (402 / 409), shipping
refuses more than 10 units (422), compensation leaves a tombstone, and every mutation is
idempotent per key: the same key and request replays the stored answer (or failure), the
same key with another request is a 422, `lookup(key)` returns what was answered.

Memory stays flat however many orders run (the RSS benchmark needs that): per-order
records (idempotency answers, charges, reservations, shipments, tombstones) live in a
window of the most recent `window` entries, far more than the orders in flight at once.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from datetime import UTC, datetime, timedelta
from typing import Any

from downstream.seed import DELIVERY_DAYS, MAX_UNITS_PER_SHIPMENT, PRODUCTS, USERS
from fsm.clients import Answer, Services
from fsm.errors import BusinessFailure, CallFailure, NotFound


class Window(OrderedDict[str, Any]):
    """A dict that forgets its oldest entries beyond `size`."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        if len(self) > self.size:
            self.popitem(last=False)


def _fail(status: int, message: str) -> CallFailure:
    if status == 404:
        return NotFound(message, status=status, body={"detail": message})
    return BusinessFailure(message, status=status, body={"detail": message})


class Ledger:
    """The fakes' shared state: balances, stock, addresses and the per-order windows."""

    def __init__(self, window: int = 10_000) -> None:
        self.balances = {u.id: u.balance for u in USERS}
        self.addresses = {u.id: u.address for u in USERS}
        self.products = {
            p.id: {"id": p.id, "category": p.category, "description": p.description,
                   "price": p.price}
            for p in PRODUCTS
        }  # fmt: skip
        self.stock = {p.id: p.stock for p in PRODUCTS}
        self.answers: Window = Window(window)  # key -> (operation, request, answer | failure)
        self.held: Window = Window(window)  # "service:order_id" -> amount / quantity / address
        self.tombstones: Window = Window(window)  # "service:order_id" -> True
        self.effects = 0  # mutations that changed state (not replays)
        self.expected_delivery = (
            datetime.now(UTC).date() + timedelta(days=DELIVERY_DAYS)
        ).isoformat()

    def once(self, key: str, operation: str, request: dict[str, Any], action: Any) -> Answer:
        """Run `action` at most once per key; replay its answer or failure afterwards."""
        fingerprint = json.dumps(request, sort_keys=True)
        stored = self.answers.get(key)
        if stored is not None:
            if stored[:2] != (operation, fingerprint):
                raise _fail(422, "idempotency key reused with a different request")
            return self._replay(stored[2])
        try:
            outcome: Answer | CallFailure = action()
        except CallFailure as exc:
            outcome = exc
        self.answers[key] = (operation, fingerprint, outcome)
        return self._replay(outcome)

    def lookup(self, key: str) -> Answer | None:
        stored = self.answers.get(key)
        return None if stored is None else self._replay(stored[2])

    @staticmethod
    def _replay(outcome: Answer | CallFailure) -> Answer:
        if isinstance(outcome, CallFailure):
            raise outcome
        return dict(outcome)


class FakeProducts:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    async def get(self, product_id: int) -> Answer:
        product = self.ledger.products.get(product_id)
        if product is None:
            raise _fail(404, f"product {product_id} not found")
        return dict(product)


class FakeUsers:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    async def lookup(self, key: str) -> Answer | None:
        return self.ledger.lookup(key)

    async def deduct(self, *, user_id: int, amount: int, order_id: str, key: str) -> Answer:
        led = self.ledger

        def act() -> Answer:
            balance = led.balances.get(user_id)
            if balance is None:
                raise _fail(404, f"user {user_id} not found")
            if f"user:{order_id}" in led.tombstones:
                raise _fail(409, f"order {order_id} was already compensated")
            if balance < amount:
                raise _fail(402, "insufficient balance")
            led.balances[user_id] = balance - amount
            led.held[f"user:{order_id}"] = led.held.get(f"user:{order_id}", 0) + amount
            led.effects += 1
            return {"user_id": user_id, "order_id": order_id, "amount": amount,
                    "balance": balance - amount}  # fmt: skip

        request = {"user_id": user_id, "amount": amount, "order_id": order_id}
        return led.once(key, "user.deduct", request, act)

    async def refund(self, *, user_id: int, amount: int, order_id: str, key: str) -> Answer:
        led = self.ledger

        def act() -> Answer:
            if user_id not in led.balances:
                raise _fail(404, f"user {user_id} not found")
            refunded = int(led.held.pop(f"user:{order_id}", 0))
            led.tombstones[f"user:{order_id}"] = True
            led.balances[user_id] += refunded
            led.effects += refunded > 0
            return {"user_id": user_id, "order_id": order_id, "refunded": refunded,
                    "balance": led.balances[user_id]}  # fmt: skip

        request = {"user_id": user_id, "amount": amount, "order_id": order_id}
        return led.once(key, "user.refund", request, act)


class FakeInventory:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    async def lookup(self, key: str) -> Answer | None:
        return self.ledger.lookup(key)

    async def deduct(self, *, product_id: int, quantity: int, order_id: str, key: str) -> Answer:
        led = self.ledger

        def act() -> Answer:
            stock = led.stock.get(product_id)
            if stock is None:
                raise _fail(404, f"product {product_id} not found")
            if f"inventory:{order_id}" in led.tombstones:
                raise _fail(409, f"order {order_id} was already compensated")
            if stock < quantity:
                raise _fail(409, "insufficient stock")
            led.stock[product_id] = stock - quantity
            held = f"inventory:{order_id}"
            led.held[held] = led.held.get(held, 0) + quantity
            led.effects += 1
            return {"product_id": product_id, "order_id": order_id, "quantity": quantity,
                    "remaining": stock - quantity}  # fmt: skip

        request = {"product_id": product_id, "quantity": quantity, "order_id": order_id}
        return led.once(key, "inventory.deduct", request, act)

    async def restore(self, *, product_id: int, quantity: int, order_id: str, key: str) -> Answer:
        led = self.ledger

        def act() -> Answer:
            if product_id not in led.stock:
                raise _fail(404, f"product {product_id} not found")
            restored = int(led.held.pop(f"inventory:{order_id}", 0))
            led.tombstones[f"inventory:{order_id}"] = True
            led.stock[product_id] += restored
            led.effects += restored > 0
            return {"product_id": product_id, "order_id": order_id, "restored": restored,
                    "remaining": led.stock[product_id]}  # fmt: skip

        request = {"product_id": product_id, "quantity": quantity, "order_id": order_id}
        return led.once(key, "inventory.restore", request, act)


class FakeShipping:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    async def lookup(self, key: str) -> Answer | None:
        return self.ledger.lookup(key)

    async def schedule(self, *, order_id: str, user_id: int, quantity: int, key: str) -> Answer:
        led = self.ledger

        def act() -> Answer:
            if quantity > MAX_UNITS_PER_SHIPMENT:
                raise _fail(422, f"cannot ship more than {MAX_UNITS_PER_SHIPMENT} units")
            address = led.addresses.get(user_id)
            if address is None:
                raise _fail(422, f"no address for user {user_id}")
            if f"shipping:{order_id}" in led.tombstones:
                raise _fail(409, f"order {order_id} was already compensated")
            if f"shipping:{order_id}" in led.held:
                raise _fail(409, f"a shipment for order {order_id} is already scheduled")
            led.held[f"shipping:{order_id}"] = address
            led.effects += 1
            return {"order_id": order_id, "status": "scheduled",
                    "expected_delivery": led.expected_delivery, "address": address}  # fmt: skip

        request = {"order_id": order_id, "user_id": user_id, "quantity": quantity}
        return led.once(key, "shipping.schedule", request, act)

    async def cancel(self, *, order_id: str, key: str) -> Answer:
        led = self.ledger

        def act() -> Answer:
            led.tombstones[f"shipping:{order_id}"] = True
            if led.held.pop(f"shipping:{order_id}", None) is None:
                return {"order_id": order_id, "status": "not_scheduled"}
            led.effects += 1
            return {"order_id": order_id, "status": "cancelled"}

        return led.once(key, "shipping.cancel", {"order_id": order_id}, act)


def fake_services(ledger: Ledger | None = None) -> Services:
    """The four fakes over one ledger (a fresh seed unless one is given)."""
    led = ledger or Ledger()
    return Services(
        product=FakeProducts(led),
        user=FakeUsers(led),
        inventory=FakeInventory(led),
        shipping=FakeShipping(led),
    )
