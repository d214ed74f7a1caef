"""Operator actions that are not a saga run: `resolve` ends a parked order an operator
fixed by hand. Like every move it is a declared edge, committed under the order's lease
with the operator's reason in the transition log, so the audit trail is the log itself.

`Audit` is who did an operator action (resume, retry compensation, cancel, resolve) and
why: the executor and `resolve` write it as its own row (scope AUDIT_SCOPE) right after
taking the lease and before acting, so the log names the person even if the action then
fails or the process dies.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from fsm import events
from fsm.errors import InvalidMove, LeaseLost
from fsm.machine import OperatorAction, OrderState, OrderTrigger
from fsm.models import Order
from fsm.store import Store


@dataclass(frozen=True)
class Audit:
    """Who (`who`: by, as, via, email) did `action`, and why (`reason`, optional)."""

    action: OperatorAction
    who: dict[str, str] = field(default_factory=dict)
    reason: str | None = None
    channel: str = "api"  # api | console | cli

    def detail(self) -> dict[str, Any]:
        detail: dict[str, Any] = {**self.who, "channel": self.channel}
        if self.reason and self.reason.strip():
            detail["reason"] = self.reason.strip()
        return detail


def admit(order: Order, allowed: Collection[str] | None) -> None:
    """Raise InvalidMove unless the order is in one of the `allowed` states (None: any).
    Called with the order's lease held, so the state it checks is the state acted on: a
    check before the claim could be stale by then (the sweep moved the order meanwhile)."""
    if allowed is not None and order.state not in allowed:
        raise InvalidMove(f"not possible while the order is {order.state}")


async def record(store: Store, order: Order, *, owner: str, audit: Audit | None) -> None:
    """Write `audit` as its own log row (a no-op without one). The caller holds the lease."""
    if audit is not None:
        await store.record_audit(
            order=order, owner=owner, action=audit.action.value, detail=audit.detail()
        )


@dataclass(frozen=True)
class Resolved:
    """What `resolve` did: the order, and whether it was resolved already (then nothing
    was written: resolving is idempotent, as cancelling a cancelled order is)."""

    order: Order
    already: bool = False


async def resolve(
    store: Store,
    order_id: uuid.UUID,
    *,
    reason: str,
    owner: str,
    operator: str | None = None,
    crash_after: str | None = None,
    audit: Audit | None = None,
    allowed: Collection[str] | None = None,
) -> Resolved:
    """needs_attention -> resolved; an order resolved already is returned as it is
    (`already`: nothing written, whatever the reason given). Raises OrderNotFound,
    LeaseLost (someone is driving it: a resume is retrying it right now) or InvalidMove
    (it is neither parked nor resolved, or not in one of the `allowed` states the caller
    offered the action in)."""
    if not reason.strip():
        raise ValueError("a reason is required")
    order = await store.claim(order_id=order_id, owner=owner)
    if order is None:
        raise LeaseLost(f"order {order_id} is being driven by another worker")
    already = order.state == OrderState.RESOLVED  # read under the lease: not stale
    try:
        if already:
            return Resolved(order, already=True)  # released below, nothing else written
        admit(order, allowed)
        if order.state != OrderState.NEEDS_ATTENTION:
            raise InvalidMove(
                f"only a parked (needs_attention) order can be resolved, not {order.state}"
            )
        await record(store, order, owner=owner, audit=audit)
        if audit is not None and operator is None:
            operator = audit.who.get("by")
        detail = {"reason": reason.strip(), "operator": operator, "was": order.attention_reason}
        with events.transition(order, "order", OrderTrigger.RESOLVE):
            await store.record_transition(  # terminal: releases the lease in the same write
                order=order,
                owner=owner,
                scope="order",
                trigger=OrderTrigger.RESOLVE,
                detail=detail,
                next_attempt_at=None,
                attention_reason=None,
            )
        if crash_after == f"order:{OrderTrigger.RESOLVE}":
            os.kill(os.getpid(), signal.SIGKILL)  # test hook: die right after the commit
    finally:  # refused or already resolved (never written), or a no-op after the
        # terminal write released it
        await store.release(order_id=order_id, owner=owner, version=order.version)
        order.lease_owner = order.lease_expires_at = None
    return Resolved(order)
