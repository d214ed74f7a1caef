"""Order events: which status change is which event (a table), and the CloudEvent each one
carries. The store writes the event in the commit of its transition (`fsm.store`, with the
statements in `fsm.outbox_sql`); `fsm.relay` sends it. Nothing here writes or sends.

An event is a CloudEvents 1.0 JSON document: `id` is `<order_id>:<seq>` (seq 0 is the
order's creation, then the seq of the transition), `subject` the order id, `data` the order
exactly as `GET /orders/{id}` shows it right after that transition, without `why` (an
explanation computed on read from the clock, leases, breakers and settings: stale by the
time an event arrives; README "Order events").
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from pydantic_core import to_jsonable_python

from fsm.machine import OrderState, Status
from fsm.models import Order

# The event of each coarse status an order enters (the creation is `pending`). `running`
# has none: it says nothing a consumer can act on. `order.compensating` is opt-in: a
# destination receives it only when it asks for it (`webhooks add URL --events ...`).
EVENT_TYPES: Mapping[Status, str] = {
    Status.PENDING: "order.created",
    Status.COMPENSATING: "order.compensating",
    Status.COMPLETED: "order.completed",
    Status.FAILED: "order.failed",
    Status.REJECTED: "order.rejected",
    Status.CANCELLED: "order.cancelled",
    Status.NEEDS_ATTENTION: "order.needs_attention",
    Status.RESOLVED: "order.resolved",
}
OPT_IN: frozenset[str] = frozenset({"order.compensating"})
DEFAULT_TYPES: tuple[str, ...] = tuple(t for t in EVENT_TYPES.values() if t not in OPT_IN)
ALL_TYPES: tuple[str, ...] = tuple(EVENT_TYPES.values())
CONTENT_TYPE = "application/cloudevents+json"


def event_type(old_status: str | None, new_status: str) -> str | None:
    """The event a move from `old_status` (None: the order is being created) causes."""
    if old_status == new_status:
        return None
    return EVENT_TYPES.get(Status(new_status))


def event_id(order_id: uuid.UUID, seq: int) -> str:
    return f"{order_id}:{seq}"


def order_document(order: Order) -> dict[str, Any]:
    """The order as `GET /orders/{id}` shows it, as JSON values (the API validates its
    answer from this, so the two cannot drift), but for `why`, which the API adds on read
    (`fsm.why`) and an event leaves out."""
    shipping = None
    if order.status == Status.COMPLETED:
        shipping = {"address": order.shipping_address, "expected_delivery": order.expected_delivery}
    document: dict[str, Any] = to_jsonable_python(
        {
            "id": order.id,
            "user_id": order.user_id,
            "product_id": order.product_id,
            "quantity": order.quantity,
            "amount": order.amount,
            "status": order.status,
            "state": order.state,
            "steps": order.step_states(),
            "shipping": shipping,
            "attempts": dict(order.attempts),
            "last_error": order.last_error,
            # Only while parked: a row retried before the retry edges cleared it keeps one.
            "attention_reason": (
                order.attention_reason if order.state == OrderState.NEEDS_ATTENTION else None
            ),
            "created_at": order.created_at,
            "updated_at": order.updated_at,
        }
    )
    return document


def cloud_event(order: Order, *, seq: int, type_: str, at: datetime, source: str) -> str:
    """The event as sent: compact JSON, keys in CloudEvents' order."""
    return json.dumps(
        {
            "specversion": "1.0",
            "id": event_id(order.id, seq),
            "source": source,
            "type": type_,
            "subject": str(order.id),
            "time": to_jsonable_python(at),
            "datacontenttype": "application/json",
            "data": order_document(order),
        },
        separators=(",", ":"),
    )


def parse_types(names: Iterable[str]) -> tuple[str, ...]:
    """Validate a subscription (comma-separated names allowed); ValueError names the bad one.
    No names at all: the default types; names given that are all blank (`--events ''`) are
    refused, not read as the default (a subscription to everything nobody asked for)."""
    chosen: list[str] = []
    given = False
    for part in names:
        given = True
        for name in part.split(","):
            name = name.strip()
            if not name:
                continue
            if name not in ALL_TYPES:
                raise ValueError(f"unknown event type {name!r} (known: {', '.join(ALL_TYPES)})")
            if name not in chosen:
                chosen.append(name)
    if given and not chosen:
        raise ValueError(
            "no event type given (an empty list): name at least one, or leave the list out "
            "for the default types"
        )
    return tuple(chosen) or DEFAULT_TYPES


def subscription(types: Iterable[str]) -> str:
    """How a destination's types are stored: ",<type>,<type>," (`wants`; SQL: LIKE)."""
    return "," + ",".join(types) + ","


def wants(stored: str, type_: str) -> bool:
    """Whether a destination subscribed as `stored` receives events of `type_`."""
    return f",{type_}," in stored


def subscribed(stored: str) -> list[str]:
    return [t for t in stored.split(",") if t]
