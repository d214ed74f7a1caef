"""One log line per saga event an operator searches for: every committed transition, a
parked order, an expired step, a lost lease. Emitted from here only, with `order_id`,
`scope`, `state` and `trigger` as fields (JSON keys under ORDER_SAGA_LOG_FORMAT=json).

The executor wraps each commit in `transition(...)`; nothing here writes or decides.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fsm.errors import ConcurrencyError
from fsm.models import STATE_COLUMN

log = logging.getLogger("order_saga.events")

# Transitions an operator is paged for, logged as warnings under their own event name.
_NOTABLE = {"park": "parked", "expire": "expired", "resolve": "resolved"}


@contextmanager
def transition(order: Any, scope: str, trigger: str, *, reason: Any = None) -> Iterator[None]:
    """Log the commit made inside the block (`order` carries its new state afterwards),
    or the lost lease / stale version that refused it; `reason` (a park's, an operator's)
    ends the line and is a field of its own."""
    source = getattr(order, STATE_COLUMN[scope])
    fields: dict[str, Any] = {"order_id": str(order.id), "scope": scope, "trigger": trigger}
    if reason is not None:
        fields["reason"] = str(reason)
    try:
        yield
    except ConcurrencyError as exc:
        log.warning(  # event: lease_lost, or stale_order (another driver moved it on)
            "order %s %s: %s %s from %s refused: %s",
            order.id,
            exc.code,
            scope,
            trigger,
            source,
            exc,
            extra={**fields, "event": exc.code, "state": source},
        )
        raise
    dest = getattr(order, STATE_COLUMN[scope])
    event = _NOTABLE.get(trigger, "transition")
    log.log(
        logging.INFO if event == "transition" else logging.WARNING,
        "order %s %s: %s %s -> %s (%s)%s",
        order.id,
        event,
        scope,
        source,
        dest,
        trigger,
        f": {reason}" if reason is not None else "",
        extra={**fields, "event": event, "state": dest, "from_state": source},
    )


def attempt_failed(
    order: Any,
    call: str,
    error: str,
    retry_in: float | None,
    *,
    this_run: int,
    max_attempts: int,
) -> None:
    """One attempt of a downstream call failed (transient): which, how many, what next.
    `max_attempts` is a budget per run; the order counts every run's failures (`attempt`),
    so a resumed run's line names both: "attempt 1 of 4 this run (5 in all)"."""
    n = order.attempts.get(call, 0)
    then = f"next attempt in {retry_in:.2f}s" if retry_in is not None else "this run gives up"
    in_all = f" ({n} in all)" if n != this_run else ""
    log.warning(
        "order %s attempt_failed: %s attempt %s of %s this run%s failed: %s; %s",
        order.id,
        call,
        this_run,
        max_attempts,
        in_all,
        error,
        then,
        extra={
            "order_id": str(order.id),
            "event": "attempt_failed",
            "call": call,
            "attempt": n,
            "run_attempt": this_run,
            "max_attempts": max_attempts,
            "error": error,
        },
    )


def waiting(order: Any, call: str, service: str, probe_in: float) -> None:
    """A call of the order waits for its service's open circuit breaker."""
    log.warning(
        "order %s waiting: %s waits for the %s circuit breaker (probe in %.1fs)",
        order.id,
        call,
        service,
        probe_in,
        extra={"order_id": str(order.id), "event": "waiting", "call": call, "service": service},
    )
