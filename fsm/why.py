"""Why a non-terminal order is where it is, in one place for the API (`GET /orders/{id}`),
the console (list and order page) and `order-saga orders list|show`.

From what is persisted only (the order row and its last logged attempt, `fsm.queries`)
and the settings the sweep runs with: it never writes, never calls a service, never asks
another process. In order of precedence, an order

- is held for an operator: its driver died under it `MAX_INTERRUPTIONS` times in a row
  (`Order.held`), so the sweep no longer takes it over, until a person resumes it;
- waits on a service's open circuit breaker (which, when the probe is due), while its
  driver holds the lease, or until the probe once nobody does (then the sweep's turn);
- waits for its next attempt of a failing call (when, how many failed, the last error), or
  for its next run after a run ended by an unexpected error (`fsm.retry.CRASHED_RUN`);
  both only while the order's retry time is set: a run starting clears it
  (`Store.start_run`), so a call in flight is never shown as waiting for its last retry;
- is being driven (leased until when: its driver renews the lease while it runs, which
  from here cannot be told apart from a driver that died a moment ago);
- is held by a lease whose owner stopped renewing it (expired: the sweep takes it over),
  also when that owner's run moved the order past its last failed attempt (a retry killed
  mid-run: the attempt's retry time is no longer what the order waits on);
- is parked in needs_attention (the reason; when the sweep retries it: its own pause and
  `SWEEP_OLDER_THAN`, whichever is later);
- or is runnable: by the sweep once it has been still for `SWEEP_OLDER_THAN` (at once when
  a stopping driver handed it back, fsm.sql.HANDED_BACK) and its retry time
  (`next_attempt_at`, which the sweep honours) has come, or now.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from fsm.machine import OrderState, StepState, is_terminal
from fsm.models import Order
from fsm.queries import Attempt, last_attempts
from fsm.registry import STEP
from fsm.retry import CRASHED_RUN
from fsm.settings import Settings
from fsm.store import Store, utcnow


class Kind(StrEnum):
    BREAKER = "waiting_on_breaker"
    NEXT_ATTEMPT = "waiting_for_next_attempt"
    LEASED = "leased"
    LEASE_EXPIRED = "lease_expired"
    HELD = "held"
    PARKED = "parked"
    RUNNABLE = "runnable"


@dataclass(frozen=True)
class Why:
    kind: Kind
    summary: str  # one line, for people
    until: datetime | None = None  # when it changes by itself (probe, attempt, expiry, sweep)
    owner: str | None = None  # the lease holder
    lease_expires_at: datetime | None = None
    service: str | None = None  # whose breaker
    call: str | None = None  # "<step>:<action>"
    failed_attempts: int | None = None
    max_attempts: int | None = None  # per run
    last_error: str | None = None
    reason: str | None = None  # a parked order's
    interruptions: int | None = None  # a held order's: its driver's deaths in a row

    def as_json(self) -> dict[str, Any]:
        return {
            k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in asdict(self).items()
        }


def at_utc(moment: datetime) -> str:
    """A moment as every surface prints it to people (`resume --order ID --dry-run` too)."""
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC"


def explain(
    order: Order,
    *,
    last: Attempt | None,
    settings: Settings,
    now: datetime,
    console: bool = False,
) -> Why | None:
    """Why `order` stands where it is (None for a terminal order: it is done). `console`:
    for the operator pages, whose actions are buttons (`_resume_now`)."""
    if is_terminal(order.state):
        return None
    # The last logged attempt speaks for the order if nothing moved it since, or if its
    # call is still unanswered (another step finishing does not end this call's wait).
    fresh = (
        last
        if last is not None and (last.at >= order.updated_at or _unanswered(order, last.call))
        else None
    )
    owner, expires = order.lease_owner, order.lease_expires_at
    alive = order.leased_at(now)
    still_from = order.updated_at + timedelta(seconds=settings.sweep_older_than)
    if owner is None and expires is not None:  # handed back by a stopping driver (fsm.sql)
        still_from = min(still_from, expires)  # the sweep takes it without waiting
    # The sweep takes an order once it has been still that long and its retry time (a
    # failed attempt's, a breaker's probe: next_attempt_at) has come.
    sweep_from = max(still_from, order.next_attempt_at or still_from)
    common: dict[str, Any] = {"owner": owner, "lease_expires_at": expires}
    # The order's retry time is cleared when a run starts (`Store.start_run`): without it
    # the last attempt's wait is over, whatever the attempt said (a new run is calling).
    retry = order.next_attempt_at
    waits = fresh is not None and fresh.waiting_on and retry is not None
    probe = fresh.next_attempt_at if fresh is not None and waits else None
    # Held: no sweep takes it, whatever else it waits for (a parked one's retry included).
    if order.held(settings.max_interruptions) and not alive:
        return Why(
            Kind.HELD,
            f"held after {order.interruptions} interruptions in a row: its driver died each "
            f"time; resume it once the cause is fixed ({_resume_now(order, console=console)})",
            interruptions=order.interruptions,
            last_error=order.last_error,
            **common,
        )
    # Parked and nobody driving it: parked, whatever its last call was waiting on when the
    # run gave up (a compensation behind an open breaker parks after its wait's bound).
    if order.state == OrderState.NEEDS_ATTENTION and not alive:
        return Why(
            Kind.PARKED,
            f"parked: {order.attention_reason}; the sweep retries it at {at_utc(sweep_from)} "
            f"(or now: {_resume_now(order, console=console)})",
            until=sweep_from,
            reason=order.attention_reason,
            last_error=order.last_error,
            **common,
        )
    if probe is not None and (alive or probe > now):
        assert fresh is not None and fresh.waiting_on is not None
        then = "" if alive else f", then the sweep drives it (from {at_utc(sweep_from)})"
        return Why(
            Kind.BREAKER,
            f"waiting on the {fresh.waiting_on} circuit breaker (probe at "
            f"{at_utc(probe)}); {fresh.call} is not called until then{then}",
            until=probe if alive else sweep_from,
            service=fresh.waiting_on,
            call=fresh.call,
            last_error=fresh.error,
            **common,
        )
    # A run moved the order after that attempt, then stopped renewing its lease (killed):
    # what the order waits on is the expired lease, not that attempt's retry time.
    dropped = owner is not None and not alive and fresh is not None and fresh.at < order.updated_at
    # A parked order's retry time is its park's pause (the branch above); held by a live
    # lease it is being retried or resolved right now, not waiting for an attempt.
    parked = order.state == OrderState.NEEDS_ATTENTION
    failed = fresh is not None and not fresh.waiting_on and retry is not None
    failed = failed and not dropped and not parked
    if fresh is not None and retry is not None and failed and (retry > now or owner is None):
        # Driven: its driver sleeps until then. Not driven: the sweep's turn, once the
        # order has also been still for SWEEP_OLDER_THAN.
        when = retry if alive else sweep_from
        by = f", driven by {owner}" if alive else " by the sweep"
        summary = (
            f"next run at {at_utc(when)}{by}: a run failed with an unexpected error "
            f"({fresh.attempt} so far), last: {fresh.error}"
            if fresh.call == CRASHED_RUN
            else f"next attempt of {fresh.call} at {at_utc(when)}{by} "
            f"({_attempts(fresh.attempt)} failed so far, at most {settings.max_attempts} per run; "
            f"last error: {fresh.error})"
        )
        return Why(
            Kind.NEXT_ATTEMPT,
            summary,
            until=when,
            call=fresh.call,
            failed_attempts=fresh.attempt,
            max_attempts=settings.max_attempts,
            last_error=fresh.error,
            **common,
        )
    if alive:
        assert expires is not None
        return Why(
            Kind.LEASED,
            f"being driven: leased by {owner} until {at_utc(expires)}, renewed while its "
            "driver runs (if the driver stopped, the sweep takes over once the lease runs out)",
            until=expires,
            last_error=order.last_error,
            **common,
        )
    if owner is not None and expires is not None:
        takeover = max(expires, sweep_from)
        return Why(
            Kind.LEASE_EXPIRED,
            f"lease of {owner} expired at {at_utc(expires)} (its driver stopped): "
            f"the sweep takes it over from {at_utc(takeover)}",
            until=takeover,
            last_error=order.last_error,
            **common,
        )
    if sweep_from > now:
        because = (
            f"still for SWEEP_OLDER_THAN={settings.sweep_older_than:g}s"
            if sweep_from == still_from
            else "its next attempt's time"
        )
        return Why(
            Kind.RUNNABLE,
            f"runnable: the sweep picks it up from {at_utc(sweep_from)} ({because}), "
            "or resume it now",
            until=sweep_from,
            last_error=order.last_error,
        )
    return Why(
        Kind.RUNNABLE,
        "runnable now: the next sweep pass (or `order-saga resume`) drives it",
        last_error=order.last_error,
    )


def _attempts(n: int) -> str:
    """The order's failed attempts of a call over all its runs (MAX_ATTEMPTS is per run)."""
    return f"{n} attempt{'' if n == 1 else 's'}"


def _resume_now(order: Order, *, console: bool) -> str:
    """How a person drives a parked or held order now, in the words of where they read
    it: the console's button (a parked one's is Retry compensation), else the API's and the
    CLI's calls with the order's own id."""
    if console:
        parked = order.state == OrderState.NEEDS_ATTENTION
        return f"{'Retry compensation' if parked else 'Resume'} on its page"
    return f"`POST /orders/{order.id}/resume` or `order-saga resume --order {order.id}`"


def _unanswered(order: Order, call: str) -> bool:
    """`call` ("payment:deduct", "payment:refund") is still in flight: its step still
    requested (the forward action) or compensating (the undo). The product lookup runs
    alone, so for it the order's own last move is the test."""
    scope, _, action = call.partition(":")
    row = STEP.get(scope)
    if row is None:
        return False
    waiting = StepState.REQUESTED if action == row.forward else StepState.COMPENSATING
    return bool(getattr(order, row.column) == waiting)


def for_orders(
    store: Store, orders: Sequence[Order], settings: Settings, *, console: bool = False
) -> dict[uuid.UUID, Why]:
    """`explain` for each non-terminal order of a page (one query for their attempts)."""
    live = [o for o in orders if not is_terminal(o.state)]
    last = last_attempts(store, [o.id for o in live])
    now = utcnow()
    found = {
        o.id: explain(o, last=last.get(o.id), settings=settings, now=now, console=console)
        for o in live
    }
    return {k: v for k, v in found.items() if v is not None}


def for_order(
    store: Store, order: Order, settings: Settings, *, console: bool = False
) -> Why | None:
    return for_orders(store, [order], settings, console=console).get(order.id)
