"""A fourth step, `loyalty` (award points, revoke them as the undo), written the way a user
adds one, without touching a file of the product: its registry row, its adapter and HTTP
client, and an in-process fake service. `order-saga` loads it with
ORDER_SAGA_STEP_MODULES=tests.support.loyalty_step (see fsm/registry.py); the test process
serves `app` (tests/test_fourth_step.py).

The fake service says "no" (409) to an even quantity, answers 503 while `BOOKS.down`, and
keeps every answer by idempotency key (replayed, and readable at /_operations/{key}).
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from fsm.clients import Answer, HttpService
from fsm.registry import StepRow

if TYPE_CHECKING:
    from fsm.models import Order

NAME = "loyalty"
# Migration of the scratch database: the step's state column, `pending` for every order.
COLUMN_DDL = f"ALTER TABLE orders ADD COLUMN {NAME}_state VARCHAR(32) NOT NULL DEFAULT 'pending'"


class HttpLoyaltyService(HttpService):
    async def award(self, *, order_id: str, user_id: int, quantity: int, key: str) -> Answer:
        body = {"order_id": order_id, "user_id": user_id, "quantity": quantity}
        return await self.send("POST", "/loyalty/award", json=body, key=key)

    async def revoke(self, *, order_id: str, key: str) -> Answer:
        return await self.send("POST", "/loyalty/revoke", json={"order_id": order_id}, key=key)


@dataclass(frozen=True)
class Loyalty:
    """Award points for the order; revoke them."""

    service: HttpLoyaltyService

    async def forward(self, order: Order, key: str) -> Answer:
        return await self.service.award(
            order_id=str(order.id), user_id=order.user_id, quantity=order.quantity, key=key
        )

    async def undo(self, order: Order, key: str) -> Answer:
        return await self.service.revoke(order_id=str(order.id), key=key)

    def forward_changes(self, answer: Answer) -> dict[str, Any]:
        return {}

    def undo_changes(self) -> dict[str, Any]:
        return {}


# The registry row (fsm.registry appends the STEPS of every ORDER_SAGA_STEP_MODULES module).
STEPS = (StepRow(NAME, NAME, "award", "revoke", Loyalty, HttpLoyaltyService),)


# -- the fake service ----------------------------------------------------------------------


@dataclass
class Books:
    points: dict[str, int] = field(default_factory=dict)  # order id -> points held
    answers: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)  # by key
    effects: Counter[str] = field(default_factory=Counter)  # key -> times applied
    down: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        with self.lock:
            self.points.clear()
            self.answers.clear()
            self.effects.clear()
            self.down = False


BOOKS = Books()


async def _award(request: Request) -> JSONResponse:
    if BOOKS.down:
        return JSONResponse({"detail": "loyalty is down"}, status_code=503)
    key, body = request.headers["Idempotency-Key"], await request.json()
    with BOOKS.lock:
        if key not in BOOKS.answers:
            if body["quantity"] % 2 == 0:
                BOOKS.answers[key] = (409, {"detail": "no points for an even quantity"})
            else:
                BOOKS.points[body["order_id"]] = body["quantity"]
                BOOKS.effects[key] += 1
                BOOKS.answers[key] = (200, {"order_id": body["order_id"], "points": 1})
        status, answer = BOOKS.answers[key]
    return JSONResponse(answer, status_code=status)


async def _revoke(request: Request) -> JSONResponse:
    key, body = request.headers["Idempotency-Key"], await request.json()
    with BOOKS.lock:
        if key not in BOOKS.answers:
            if BOOKS.points.pop(body["order_id"], None) is not None:
                BOOKS.effects[key] += 1
            BOOKS.answers[key] = (200, {"order_id": body["order_id"], "revoked": True})
        status, answer = BOOKS.answers[key]
    return JSONResponse(answer, status_code=status)


async def _operation(request: Request) -> JSONResponse:
    stored = BOOKS.answers.get(request.path_params["key"])
    if stored is None:
        return JSONResponse({"detail": "unknown key"}, status_code=404)
    return JSONResponse({"status_code": stored[0], "body": stored[1]})


app = Starlette(
    routes=[
        Route("/loyalty/award", _award, methods=["POST"]),
        Route("/loyalty/revoke", _revoke, methods=["POST"]),
        Route("/_operations/{key}", _operation, methods=["GET"]),
    ]
)
