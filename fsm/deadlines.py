"""When an order stops waiting: its own deadline after creation (ORDER_SAGA_ORDER_DEADLINE),
the product lookup's and a forward call's. Pure functions of the order and the retry
policy (and the clock, for `passed`): no I/O, no transitions; the executor decides what a
passed deadline means for the order."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from fsm.models import Order
from fsm.retry import RetryPolicy
from fsm.store import utcnow


def of_order(order: Order, policy: RetryPolicy) -> datetime | None:
    """The order's own deadline (None: the policy sets none)."""
    if policy.order_deadline is None:
        return None
    return order.created_at + timedelta(seconds=policy.order_deadline)


def passed(order: Order, policy: RetryPolicy) -> bool:
    deadline = of_order(order, policy)
    return deadline is not None and utcnow() >= deadline


def why(order: Order, policy: RetryPolicy) -> dict[str, Any]:
    """Why the order stopped waiting, for its transition's detail."""
    deadline = of_order(order, policy)
    return {
        "reason": f"order deadline of {policy.order_deadline:g}s after creation passed",
        "deadline": deadline.isoformat() if deadline else None,
    }


def of_product_lookup(order: Order, policy: RetryPolicy) -> datetime:
    """Past it an unanswered product lookup makes the product unavailable."""
    return order.created_at + timedelta(seconds=policy.step_deadline)


def of_forward_call(order: Order, policy: RetryPolicy) -> datetime | None:
    """When a forward call stops being retried: the step deadline or the order's."""
    return earliest(order.deadline_at, of_order(order, policy))


def earliest(a: datetime | None, b: datetime | None) -> datetime | None:
    """The sooner of two deadlines, either of which may be none."""
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)
