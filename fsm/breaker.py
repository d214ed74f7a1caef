"""A circuit breaker per downstream operation (`user.deduct`, `user.refund`, `user.lookup`,
...), shared by every order of the process (issues 10, 16).

Why per operation and not per service: outages are often partial. With only `user.deduct`
answering 500, a per-service breaker was closed again by the user service's healthy
refunds and lookups (which resumed orders make first), so it flapped (7 opens in 15 s)
and 26-182 deducts per run still reached the failing endpoint; and while it was open it
also held back the refunds that compensations needed and the service could do. Per
operation, only the failing endpoint is shielded, only its own answers close it, and
compensations keep flowing. A whole-service outage costs `threshold` failures per
operation instead of per service (a few calls more), a price worth a breaker that tells
the truth about each endpoint.

closed --N consecutive transient failures--> open --cool-down--> half-open (one probe)
half-open --probe answers--> closed;  half-open --probe fails--> open (cool-down again)

While a breaker is open no call reaches its service: the wrapped client raises
`CircuitOpen` (a `TransientFailure`, so code that knows nothing of breakers sees an outage)
and `call_through`, the executor's retry-loop hook, waits for the breaker instead of
spending an attempt: until it closes, or the caller's deadline (a forward step's) passes,
or the caller's `patience` (a compensation's: as long as its run's retries could take) is
spent, which raises `BreakerWaitOver` so that the run ends and the order parks, visible,
until a later run retries it (a compensation used to wait as long as the outage lasted,
and the resume or cancel that drove it never answered). When a probe closes the breaker,
every waiter is woken at once and calls again through a semaphore, so the orders that
waited are driven immediately, at most `batch` calls at a time.

A definite answer (2xx or a business 4xx) is a success for the breaker: the service is up.

Why a small class and not a library: purgatory 3.0 (asyncio, maintained) and aiobreaker
1.2 (asyncio, last release 2021) both let *every* concurrent call through while half-open
(no single probe), and both only raise while open: neither can wait for the circuit with
a deadline nor release waiters in bounded batches, which is what keeps the saga's retry
budgets intact. Their storage backends (Redis) solve a problem this process does not have.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

from prometheus_client import Counter, Gauge

from fsm.clients import Services
from fsm.errors import BreakerWaitOver, CallFailure, CircuitOpen, TransientFailure
from fsm.registry import SERVICES
from fsm.settings import Settings

log = logging.getLogger("order_saga.breaker")
T = TypeVar("T")

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
_GAUGE_VALUE = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}

# Each `serve --workers` process has its own breakers: /metrics shows the worst of them.
STATE = Gauge(
    "order_saga_breaker_state",
    "Circuit breaker state: 0 closed, 1 half-open, 2 open",
    ["operation"],
    multiprocess_mode="max",
)
TRANSITIONS = Counter(
    "order_saga_breaker_transitions_total",
    "Circuit breaker state changes",
    ["operation", "from_state", "to_state"],
)
REJECTED = Counter(
    "order_saga_breaker_rejected_calls_total",
    "Calls not made because the operation's breaker was open",
    ["operation"],
)


@dataclass
class BreakerStats:
    admitted: int = 0  # calls let through to the service
    probes: int = 0  # of which half-open probes
    rejected: int = 0  # calls refused while open
    late_failures: int = 0  # calls admitted while closed that failed after it opened


class Breaker:
    """One service's breaker. Single event loop; no locks needed (no await between checks)."""

    def __init__(
        self,
        service: str,
        *,
        threshold: int = 3,
        cooldown: float = 5.0,
        batch: int = 20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service = service
        self.threshold = threshold
        self.cooldown = cooldown
        self.clock = clock
        self.stats = BreakerStats()
        self.batch = asyncio.Semaphore(batch)  # calls of woken waiters in flight at once
        self._state = CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False
        self._changed = asyncio.Event()  # replaced on every change; waiters hold the old one
        STATE.labels(operation=service).set(0)

    # -- reading ---------------------------------------------------------------------

    @property
    def state(self) -> str:
        """closed, open, or half_open (cool-down over: the next call is the probe)."""
        if self._state == OPEN and self._cooled():
            return HALF_OPEN
        return self._state

    def retry_after(self) -> float:
        """Seconds until a probe may be sent (0 when it may be sent now)."""
        if self._state != OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.cooldown - self.clock())

    def _may_try(self) -> bool:
        if self._state == CLOSED:
            return True
        if self._probing:
            return False
        return self._state == HALF_OPEN or self._cooled()

    def _cooled(self) -> bool:
        return self.clock() >= self._opened_at + self.cooldown

    # -- calling ---------------------------------------------------------------------

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Make the call if the breaker allows it; raise CircuitOpen (no call) if not."""
        probe = self._admit()
        self.stats.admitted += 1
        try:
            result = await fn()
        except TransientFailure as exc:
            self._failed(probe, exc)
            raise
        except CallFailure:
            self._succeeded(probe)  # a definite "no" is an answer: the service is up
            raise
        except BaseException:  # cancelled mid-probe: let another caller probe
            if probe:
                self._probing = False
                self._wake()
            raise
        self._succeeded(probe)
        return result

    def refuse(self) -> CircuitOpen:
        self.stats.rejected += 1
        REJECTED.labels(operation=self.service).inc()
        wait = self.retry_after()
        return CircuitOpen(
            f"{self.service}: circuit breaker {self.state}, no call made (probe in {wait:.1f}s)",
            service=self.service,
            retry_after=wait,
            breaker=self,
        )

    def _admit(self) -> bool:
        """True if this call is the half-open probe; raises CircuitOpen if refused."""
        if self._state == CLOSED:
            return False
        if self._state == OPEN and self._cooled():
            self._move(HALF_OPEN, f"cool-down of {self.cooldown}s over: one probe")
        if self._state == HALF_OPEN and not self._probing:
            self._probing = True
            self.stats.probes += 1
            return True
        raise self.refuse()

    def _failed(self, probe: bool, exc: Exception) -> None:
        if probe:
            self._probing = False
            self._open(f"probe failed: {exc}")
        elif self._state == CLOSED:
            self._failures += 1
            if self._failures >= self.threshold:
                self._open(f"{self._failures} consecutive transient failures, last: {exc}")
        else:
            self.stats.late_failures += 1

    def _succeeded(self, probe: bool) -> None:
        if probe:
            self._probing = False
        self._failures = 0
        if self._state != CLOSED:
            self._move(CLOSED, "probe answered" if probe else "a call answered")

    def _open(self, reason: str) -> None:
        self._opened_at = self.clock()
        self._move(OPEN, f"{reason}; calls wait {self.cooldown}s for a probe")

    def _move(self, state: str, reason: str) -> None:
        before, self._state = self._state, state
        level = logging.INFO if state == CLOSED else logging.WARNING
        log.log(level, "circuit breaker %s: %s -> %s (%s)", self.service, before, state, reason)
        STATE.labels(operation=self.service).set(_GAUGE_VALUE[state])
        TRANSITIONS.labels(operation=self.service, from_state=before, to_state=state).inc()
        self._wake()

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # -- waiting ---------------------------------------------------------------------

    def gave_up(self, patience: float, last: Exception) -> BreakerWaitOver:
        """The error of a caller that waited `patience` seconds and the breaker is still not
        closed (fsm.executor parks the order with it)."""
        return BreakerWaitOver(
            f"{self.service}: circuit breaker still {self.state} after {patience:g}s of "
            f"waiting (probe in {self.retry_after():.1f}s); last: {last}",
            service=self.service,
            retry_after=self.retry_after(),
            breaker=self,
        )

    async def wait(self, deadline: datetime | None) -> bool:
        """Until a call may be tried (closed, or a probe may be sent): True; False once
        `deadline` (wall clock, UTC) has passed first. No deadline: as long as it takes."""
        while not self._may_try():
            timeout = self.retry_after() if self._state == OPEN else None
            if deadline is not None:
                left = (deadline - datetime.now(deadline.tzinfo)).total_seconds()
                if left <= 0:
                    return False
                timeout = left if timeout is None else min(timeout, left)
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except TimeoutError:
                pass
        return True


Waiting = Callable[["Breaker", Exception], Awaitable[None]]


async def call_through(
    fn: Callable[[], Awaitable[T]],
    *,
    deadline: datetime | None,
    on_wait: Waiting | None = None,
    patience: float | None = None,
) -> T:
    """The executor's retry-loop hook: make the call; if a breaker refuses it, wait for
    that breaker (not spending a retry attempt) and call again. After waiting, calls go
    through the breaker's batch semaphore, so a closing breaker releases its waiters in
    bounded batches. Raises the last error once `deadline` has passed while waiting, and
    `BreakerWaitOver` once this call has waited `patience` seconds in all (from its first
    wait) with the deadline still ahead: a compensation's bound, so that its run ends.
    `on_wait(breaker, error)` is awaited each time a wait starts (the executor records it
    on the order: "waiting on the user breaker, probe at T")."""
    waited: Breaker | None = None
    until: datetime | None = None  # the end of the patience, set at the first wait

    async def wait(breaker: Breaker, error: Exception) -> None:
        nonlocal until
        if on_wait is not None:
            await on_wait(breaker, error)
        if patience is not None and until is None:
            until = datetime.now(UTC) + timedelta(seconds=patience)
        if until is None or (deadline is not None and deadline <= until):
            if not await breaker.wait(deadline):
                raise error
        elif not await breaker.wait(until):
            assert patience is not None
            raise breaker.gave_up(patience, error) from error

    while True:
        try:
            if waited is None:
                return await fn()
            async with waited.batch:
                return await fn()
        except CircuitOpen as refused:
            waited = cast(Breaker, refused.breaker)
            await wait(waited, refused)
        except TransientFailure as failed:
            # After waiting, a failure that leaves the breaker open (this call was the probe,
            # or was admitted just before the probe failed) is still the outage, not this
            # order's attempt: keep waiting, so waiting never spends the retry budget.
            if waited is None or waited.state == CLOSED:
                raise
            await wait(waited, failed)


class _Guarded:
    """A service client whose every method goes through that operation's breaker."""

    def __init__(self, client: object, breakers: Breakers, service: str) -> None:
        self._client = client
        self._breakers = breakers
        self._service = service

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)
        breaker = self._breakers[f"{self._service}.{name}"]

        async def guarded(*args: Any, **kwargs: Any) -> Any:
            return await breaker.call(lambda: method(*args, **kwargs))

        return guarded


class Breakers:
    """The breakers of one process, by operation (`service.method`), made on first use."""

    def __init__(self, *, threshold: int = 3, cooldown: float = 5.0, batch: int = 20) -> None:
        self.threshold, self.cooldown, self.batch = threshold, cooldown, batch
        self.by_operation: dict[str, Breaker] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> Breakers:
        return cls(
            threshold=settings.breaker_threshold,
            cooldown=settings.breaker_cooldown,
            batch=settings.breaker_batch,
        )

    def __getitem__(self, operation: str) -> Breaker:
        """The breaker of `operation` ("user.deduct"), made closed on first use."""
        breaker = self.by_operation.get(operation)
        if breaker is None:
            breaker = self.by_operation[operation] = Breaker(
                operation, threshold=self.threshold, cooldown=self.cooldown, batch=self.batch
            )
        return breaker

    def wrap(self, services: Services) -> Services:
        """The Services decorator: the same clients, each call behind its operation's
        breaker."""
        guarded = {
            name: _Guarded(services[name], self, name) for name in (s.name for s in SERVICES)
        }
        return Services(**guarded)  # each stands in for its Protocol

    def not_closed(self) -> dict[str, str]:
        """Operations whose breaker is open or half-open, with that state (for /healthz)."""
        return {name: b.state for name, b in self.by_operation.items() if b.state != CLOSED}

    def check(self, operation: str) -> None:
        """Raise CircuitOpen if `operation`'s breaker is open and not yet due for a probe
        (POST /orders refuses before creating anything while `product.get` is out)."""
        breaker = self.by_operation.get(operation)
        if breaker is not None and breaker.state == OPEN:
            raise breaker.refuse()
