"""One downstream call of one order, tried as hard as this run's retry policy allows, and
the bookkeeping of every attempt: a failed attempt, a wait on an open breaker, a run given
up or crashed is noted on the order (its error, its next attempt: what the sweep and `why`
read) and logged; each attempt's latency and the call's outcome are counted. A run that
kills its whole process is counted by the claims instead (`orders.interruptions`); `hold`
says so once the sweep stops taking such an order over (`Order.held`).

It decides nothing about the saga: the executor says which call to make, with which key
and deadline, and what its outcome means for the order (no transitions are written here).

    attempts = Attempts(store=store, owner=owner, policy=policy)
    answer = await attempts.call(order, "payment:deduct", fn, deadline=deadline)
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime, timedelta
from functools import partial
from typing import Any, TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    retry_if_not_exception_type,
    stop_after_attempt,
    stop_any,
    wait_random_exponential,
)

from fsm import events, metrics
from fsm.breaker import Breaker, call_through
from fsm.errors import BreakerWaitOver, CallFailure, TransientFailure
from fsm.models import Order
from fsm.registry import STEP
from fsm.retry import CRASHED_RUN, RetryPolicy, doubling, stop_at
from fsm.store import Store, utcnow

# The executor's logger: these lines were, and are read as, the executor's.
log = logging.getLogger("order_saga.executor")
T = TypeVar("T")


class Attempts:
    """The attempts of one executor (its store, owner and policy) at its orders' calls."""

    def __init__(self, *, store: Store, owner: str, policy: RetryPolicy) -> None:
        self.store = store
        self.owner = owner
        self.policy = policy

    async def call(
        self,
        order: Order,
        call: str,
        fn: Callable[[], Awaitable[T]],
        *,
        deadline: datetime | None,
        patience: float | None = None,
    ) -> T:
        """Retry transient failures with the same key; persist every attempt's schedule.
        The first attempt runs bare: building tenacity's machinery cost ~0.5 ms a call,
        more than the call itself, and most calls succeed the first time. `patience`: how
        long an attempt may wait on an open breaker (None: until `deadline`); past it the
        call is not retried in this run (BreakerWaitOver)."""
        # An open breaker: wait, spend no attempt, and say so on the order.
        waits = partial(self._waits, order, call)
        fn = partial(call_through, fn, deadline=deadline, on_wait=waits, patience=patience)
        scope, _, action = call.partition(":")  # "payment:deduct", "product:get"
        service = STEP[scope].service if scope in STEP else scope  # payment -> user
        fn = metrics.timed(fn, service, action)  # each attempt's latency
        before = order.attempts.get(call, 0)  # earlier runs' failed attempts
        try:
            try:
                result = await fn()
            except TransientFailure as first:
                result = await self._retry(
                    order, call, fn, deadline=deadline, first=first, before=before
                )
        except BreakerWaitOver:
            # Waited its bound on an open breaker: no call was made, so no attempt is spent
            # and no call outcome counted. The wait is on the order already (`_waits`: its
            # last error names the breaker); the park that follows says the rest.
            raise
        except CallFailure as exc:
            outcome = "transient" if isinstance(exc, TransientFailure) else "business"
            metrics.call_outcome(service, action, outcome).inc()
            if isinstance(exc, TransientFailure):
                await self.gave_up(order, call, exc, before=before)
            raise
        metrics.call_outcome(service, action, "success").inc()
        return result

    async def gave_up(self, order: Order, call: str, exc: TransientFailure, *, before: int) -> None:
        """This run stops trying `call`: the failure and a later attempt, on the order.
        `before`: the call's failed attempts when this run started trying it."""
        await self._note(order, call, str(exc), self.policy.backoff_max)
        self._failed(order, call, str(exc), None, before=before)

    async def note_crash(self, order: Order, exc: Exception) -> None:
        """A run ended by an error the engine does not expect (a bug, a value it cannot
        store): the next run from the same persisted state most likely ends the same way,
        so it is not silent. The error goes on the order (`last_error`, the attempts log:
        `why` names it) and the sweep's next run waits a doubling pause, from `backoff_max`
        up to `park_max`, instead of repeating it at every pass. Nothing else changes: the
        order stays where it is, its steps are never skipped (SPEC §3)."""
        runs = order.attempts.get(CRASHED_RUN, 0) + 1
        pause = doubling(self.policy.backoff_max, self.policy.park_max, runs)
        error = f"{type(exc).__name__}: {exc}"  # the store makes it storable
        try:
            await self._note(order, CRASHED_RUN, error, pause)
        except Exception as failed:  # the database may be why the run failed
            log.warning("could not note the failed run of order %s: %s", order.id, failed)

    def _note(
        self, order: Order, call: str, error: str, pause: float, *, waiting_on: str | None = None
    ) -> Coroutine[Any, Any, None]:
        """The store's note of `call` on the order, its next attempt `pause` seconds from
        now: the store's own coroutine, for the caller to await (no await of its own)."""
        return self.store.note_attempt(
            order=order, owner=self.owner, call=call, error=error,
            next_attempt_at=utcnow() + timedelta(seconds=pause), waiting_on=waiting_on,
        )  # fmt: skip

    def _failed(
        self, order: Order, call: str, error: str, retry_in: float | None, *, before: int
    ) -> None:
        """Log a failed attempt just noted on the order: its number in this run (the
        budget is MAX_ATTEMPTS per run) beside the order's total over every run."""
        this_run = order.attempts.get(call, 0) - before
        events.attempt_failed(
            order, call, error, retry_in, this_run=this_run, max_attempts=self.policy.max_attempts
        )

    async def _retry(
        self,
        order: Order,
        call: str,
        fn: Callable[[], Awaitable[T]],
        *,
        deadline: datetime | None,
        first: TransientFailure,
        before: int,
    ) -> T:
        """Attempts 2..n under tenacity; attempt 1 (already failed) is replayed as its first."""
        replay: list[TransientFailure] = [first]

        async def attempt() -> T:
            if replay:
                raise replay.pop()
            return await fn()

        async def note(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            sleep = state.upcoming_sleep
            await self._note(order, call, str(exc), sleep)
            self._failed(order, call, str(exc), sleep, before=before)

        retrying = AsyncRetrying(
            stop=stop_any(stop_after_attempt(self.policy.max_attempts), stop_at(deadline)),
            wait=wait_random_exponential(
                multiplier=self.policy.backoff_base, max=self.policy.backoff_max
            ),
            retry=retry_if_exception_type(TransientFailure)
            & retry_if_not_exception_type(BreakerWaitOver),  # waited its bound: this run ends
            before_sleep=note,
            reraise=True,
        )
        result: T = await retrying(attempt)
        return result

    async def _waits(self, order: Order, call: str, breaker: Breaker, error: Exception) -> None:
        """A call of `order` starts waiting for `breaker`: recorded on the order (why it
        stands still, when the probe is due) and logged with its id."""
        probe = breaker.retry_after()
        await self._note(order, call, str(error), probe, waiting_on=breaker.service)
        events.waiting(order, call, breaker.service, probe)


def hold(order: Order) -> None:
    """Say, once per hold (`Order.held`: its run gives it back undriven), that the order
    waits for a person, and count it."""
    metrics.HELD.inc()
    log.warning(
        "order %s held: %d interruptions in a row (its driver died each time, at the "
        "same point), not driven again automatically; find why in the log of the process "
        "that drove it (OOM, a crash), then resume it: order-saga resume --order %s",
        order.id,
        order.interruptions,
        order.id,
        extra={
            "order_id": str(order.id),
            "event": "held",
            "state": order.state,
            "interruptions": order.interruptions,
        },
    )
