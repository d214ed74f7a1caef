"""The errors the saga raises, each with a stable code the API maps to a status.

SagaError
├── CallFailure                 a downstream call did not succeed
│   ├── BusinessFailure         a definite "no" (4xx): not retried, had no effect
│   │   └── NotFound            404 (product lookup: the order is rejected)
│   └── TransientFailure        5xx, timeout, connection error: outcome unknown
│       └── CircuitOpen         not called: the service's circuit breaker is open
│           └── BreakerWaitOver a compensation waited its run's bound on an open breaker
├── ConcurrencyError            another driver owns or moved the order
│   ├── StaleOrder              optimistic version check failed
│   └── LeaseLost               the lease is held by another owner (or expired)
├── OrderNotFound               no such order id
├── CorruptOrder                a stored row holds a state no machine declares
└── InvalidMove                 the trigger is not declared from the order's state
"""

from __future__ import annotations

import sqlite3
from typing import Any


class SagaError(Exception):
    code = "saga_error"


class CallFailure(SagaError):
    code = "call_failure"

    def __init__(self, message: str, *, status: int | None = None, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body

    def detail(self) -> dict[str, Any]:
        return {"error": self.code, "status": self.status, "message": str(self)}


class BusinessFailure(CallFailure):
    code = "business_failure"


class NotFound(BusinessFailure):
    code = "not_found"


class TransientFailure(CallFailure):
    code = "transient_failure"


class CircuitOpen(TransientFailure):
    """No call was made: the service's breaker is open (fsm.breaker). Transient, so code
    unaware of breakers treats it like any outage; `retry_after` is the seconds until the
    breaker lets a probe through."""

    code = "circuit_open"

    def __init__(self, message: str, *, service: str, retry_after: float, breaker: Any) -> None:
        super().__init__(message)
        self.service = service
        self.retry_after = retry_after
        self.breaker = breaker


class BreakerWaitOver(CircuitOpen):
    """A compensation waited on an open breaker as long as one run may (fsm.breaker,
    `call_through`'s `patience`): this run stops trying that call, not retried within the
    run; the order parks and a later run retries it (SPEC §2: never skipped)."""

    code = "breaker_wait_over"


class ConcurrencyError(SagaError):
    code = "concurrency"


class StaleOrder(ConcurrencyError):
    code = "stale_order"


class LeaseLost(ConcurrencyError):
    code = "lease_lost"


class OrderNotFound(SagaError):
    code = "order_not_found"


class CorruptOrder(SagaError):
    code = "corrupt_order"


class InvalidMove(SagaError):
    code = "invalid_move"


class StoreUnavailable(SagaError):
    """The database is down, unreachable, or a lock/statement timeout expired: nothing was
    decided, try again later (the API answers 503 + Retry-After). `str()` is for the log
    (PostgreSQL's driver names the host and port); `public` is what a caller may be told."""

    code = "store_unavailable"

    def __init__(self, message: str = "", *, public: str | None = None) -> None:
        super().__init__(message)
        self.public = public or message.partition(":")[0] or "database unavailable"


def store_unavailable(kind: str, driver_error: BaseException | None) -> StoreUnavailable:
    """`kind` ("database unavailable", "database busy") and the driver's first line, for the
    log; callers are told `kind` alone, or SQLite's own words too (a fixed phrase of its
    library, "database or disk is full", naming no host, port or file)."""
    first = (str(driver_error).strip().splitlines() or [""])[0]
    told = f"{kind}: {first}" if isinstance(driver_error, sqlite3.Error) and first else kind
    return StoreUnavailable(f"{kind}: {first}", public=told)


def public_text(exc: BaseException) -> str:
    """What an HTTP caller may read of a database error: never the driver's text."""
    return exc.public if isinstance(exc, StoreUnavailable) else "database error"


def outage(exc: BaseException) -> bool:
    """The database is unavailable, nothing else: StoreUnavailable, or a group of them (the
    executor's concurrent steps), or SQLAlchemy's OperationalError (the background passes
    on an engine: retention, partitions). A retry later is all there is to do; no
    traceback needed."""
    from sqlalchemy.exc import OperationalError

    if isinstance(exc, BaseExceptionGroup):
        return exc.split((StoreUnavailable, OperationalError))[1] is None
    return isinstance(exc, StoreUnavailable | OperationalError)


def outage_line(exc: BaseException) -> str:
    """An outage (`outage`) in one line for the log: "database unavailable: " and the
    driver's first line (SQLAlchemy's own text adds a second, a link)."""
    from sqlalchemy.exc import OperationalError

    if isinstance(exc, OperationalError):
        return str(store_unavailable("database unavailable", exc.orig))
    return str(exc).partition("\n")[0]
