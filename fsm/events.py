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
def transition(order: Any, scope: str, trigger: str) -> Iterator[None]:
    """Log the commit made inside the block (`order` carries its new state afterwards),
    or the lost lease / stale version that refused it."""
    source = getattr(order, STATE_COLUMN[scope])
    fields: dict[str, Any] = {"order_id": str(order.id), "scope": scope, "trigger": trigger}
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
        "order %s %s: %s %s -> %s (%s)",
        order.id,
        event,
        scope,
        source,
        dest,
        trigger,
        extra={**fields, "event": event, "state": dest, "from_state": source},
    )
