"""Advance one order: fire a trigger -> commit it -> call the service -> commit the outcome.

The executor owns no state between runs: everything it needs to continue is in the order
row (states, version, retry schedule) and every side effect is preceded by a committed
intent transition, so a run killed anywhere is continued by the next one (SPEC §3).
It holds the order's lease for the whole run: one task renews the leases of every order
this executor drives (one statement per interval), and the terminal transition releases it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Coroutine
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from functools import partial
from typing import Any, TypeGuard, TypeVar

from fsm import deadlines, events, metrics, operator
from fsm.attempts import Attempts, hold
from fsm.bounds import MAX_AMOUNT
from fsm.clients import Answer, Services
from fsm.errors import (
    BreakerWaitOver,
    BusinessFailure,
    CallFailure,
    InvalidMove,
    LeaseLost,
    NotFound,
    SagaError,
    TransientFailure,
)
from fsm.machine import (
    OrderState,
    OrderTrigger,
    Step,
    StepState,
    StepTrigger,
    decide,
    is_terminal,
    to_compensate,
)
from fsm.models import Order
from fsm.operator import Audit
from fsm.registry import STEP, STEP_NAMES, bind
from fsm.retry import RetryPolicy, doubling
from fsm.steps import idempotency_key
from fsm.store import Store, utcnow

__all__ = ["Executor", "new_owner"]

log = logging.getLogger("order_saga.executor")
T = TypeVar("T")
ALL_STEPS = frozenset(STEP_NAMES)
# Where the order deadline fails the order outright: no step has started, nothing to undo.
_BEFORE_STEPS = frozenset({OrderState.PENDING, OrderState.PRODUCT_REQUESTED})


@dataclasses.dataclass(frozen=True)
class Unfinished:
    """A compensation this run could not finish: why, and whether only an open breaker
    stood in its way (`outage`: retried sooner once parked)."""

    reason: str
    outage: bool


def new_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Executor:
    def __init__(
        self,
        *,
        store: Store,
        services: Services,
        policy: RetryPolicy | None = None,
        owner: str | None = None,
        crash_after: str | None = None,
    ) -> None:
        self.store = store
        self.services = services
        self.steps = bind(services.__getitem__)
        self.policy = policy or RetryPolicy()
        self.owner = owner or new_owner()
        # Each call's attempts, their notes on the order and their log lines (fsm.attempts).
        self._attempts = Attempts(store=store, owner=self.owner, policy=self.policy)
        # Test hook: "scope:trigger" -> SIGKILL this process right after that commit.
        self.crash_after = crash_after
        # Orders this executor is driving now. The lease is re-entrant for its owner (so a
        # crashed-and-restarted owner can continue), so a second run inside this process
        # (a resume or cancel during a background run) must be refused here.
        self._driving: set[uuid.UUID] = set()
        self._keeper: asyncio.Task[None] | None = None

    @property
    def driving(self) -> Collection[uuid.UUID]:
        return self._driving

    # -- entry points ----------------------------------------------------------------

    async def run(
        self,
        order_id: uuid.UUID,
        *,
        audit: Audit | None = None,
        allowed: Collection[str] | None = None,
    ) -> Order:
        """Claim the order and drive it as far as this run's retry budget allows. With
        `audit` (a person's resume), a live order's log first names who and why. With
        `allowed`, an order found (under the lease) in another state is not driven:
        InvalidMove, nothing written."""
        _, drive = await self.prepare_run(order_id, audit=audit, allowed=allowed)
        return await drive

    async def prepare_run(
        self,
        order_id: uuid.UUID,
        *,
        audit: Audit | None = None,
        allowed: Collection[str] | None = None,
    ) -> tuple[Order, Coroutine[Any, Any, Order]]:
        """`run` in two halves, for a caller that awaits the drive elsewhere (the API runs
        it in the background and answers 202 if it outlasts RESPOND_WITHIN, api.runner):
        now the order is claimed, checked and its audit row written, raising what `run`
        raises before it drives (not found, held by another driver, not allowed); returned,
        the order and its drive, which must be awaited (it gives the lease back)."""
        order = await self._claim_reserved(order_id)
        async with self._given_back_on_error(order):
            operator.admit(order, allowed)
            await self._record(order, audit)
        return order, self._drive_reserved(order)

    async def cancel(
        self,
        order_id: uuid.UUID,
        *,
        audit: Audit | None = None,
        allowed: Collection[str] | None = None,
    ) -> Order:
        """The owner cancels a completed order: refund, restore, cancel shipping. With
        `audit`, the log first names who cancelled and why; `allowed` as for `run`."""
        _, drive = await self.prepare_cancel(order_id, audit=audit, allowed=allowed)
        return await drive

    async def prepare_cancel(
        self,
        order_id: uuid.UUID,
        *,
        audit: Audit | None = None,
        allowed: Collection[str] | None = None,
    ) -> tuple[Order, Coroutine[Any, Any, Order]]:
        """`cancel` in two halves, as `prepare_run`: the cancellation is committed now (or
        refused: InvalidMove for an order that is neither completed nor cancelling), the
        compensations are the drive returned."""
        order = await self._claim_reserved(order_id)
        async with self._given_back_on_error(order):
            operator.admit(order, allowed)
            if order.state == OrderState.COMPLETED:
                await operator.record(self.store, order, owner=self.owner, audit=audit)
                # One commit: a crash can never keep the request but lose the transition.
                await self._fire(order, "order", OrderTrigger.CANCEL, cancel_requested=True)
            elif not order.cancel_requested:
                raise InvalidMove(f"only a completed order can be cancelled (it is {order.state})")
        return order, self._drive_reserved(order)

    def drive(self, order: Order, *, audit: Audit | None = None) -> Coroutine[Any, Any, Order]:
        """Advance an order whose lease we hold; the lease is always given back. The order
        is reserved in this process at the call (before the first await), so a resume or
        cancel arriving before the run starts is refused, not run beside it. With `audit`
        (a person's bulk resume), a live order's log first names who and why."""
        self._reserve(order.id)
        return self._audited(order, audit)

    async def _claim_reserved(self, order_id: uuid.UUID) -> Order:
        """Reserve the order in this process and take its lease; if the claim fails, the
        reservation is given back."""
        self._reserve(order_id)
        try:
            return await self._claim(order_id)
        except BaseException:
            self._driving.discard(order_id)
            raise

    @asynccontextmanager
    async def _given_back_on_error(self, order: Order) -> AsyncIterator[None]:
        """If the body raises, the order's lease and reservation are given back before the
        error goes on (nothing was driven)."""
        try:
            yield
        except BaseException:
            try:
                await self._release(order)
            finally:
                self._driving.discard(order.id)
            raise

    async def _audited(self, order: Order, audit: Audit | None) -> Order:
        """Drive a reserved, leased order, its audit row (if any) written first; if that
        write fails the lease is given back and nothing is driven. Held (its driver died
        under it MAX_INTERRUPTIONS times in a row) and no person acting: given back as it
        is, for an operator (Order.held)."""
        async with self._given_back_on_error(order):
            await self._record(order, audit)
        if audit is None and order.held(self.store.max_interruptions):
            hold(order)
            try:
                await self._release(order)
            finally:
                self._driving.discard(order.id)
            return order
        return await self._drive_reserved(order)

    async def _record(self, order: Order, audit: Audit | None) -> None:
        """A person's action on a live order: who and why, in its log before it moves."""
        if audit is not None and not is_terminal(order.state):
            await operator.record(self.store, order, owner=self.owner, audit=audit)

    def _reserve(self, order_id: uuid.UUID) -> None:
        """One action per order at a time in this process. The lease is re-entrant for
        its owner and every run of this executor shares the owner, so two actions of one
        process (a cancel racing a resume) would otherwise both hold it, and the first
        to finish would release the other's lease under it. Synchronous: no await between
        the check and the claim on the set."""
        if order_id in self._driving:
            raise LeaseLost(f"order {order_id} is being driven right now (another action)")
        self._driving.add(order_id)
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.create_task(self._keep_leases())

    async def _claim(self, order_id: uuid.UUID) -> Order:
        order = await self.store.claim(order_id=order_id, owner=self.owner)
        if order is None:
            raise LeaseLost(f"order {order_id} is being driven by another worker")
        return order

    async def _drive_reserved(self, order: Order) -> Order:
        started = time.perf_counter()
        stopped = False
        try:
            if not is_terminal(order.state):
                await self.store.start_run(order=order, owner=self.owner)
            await self._advance(order)
        except asyncio.CancelledError:  # this process stops (SIGTERM): the next driver now
            stopped = True
            raise
        except Exception as exc:
            await self._reload(order)  # what was queued after the failure never happened
            if not isinstance(exc, SagaError):
                await self._attempts.note_crash(order, exc)
            raise
        finally:
            try:
                if not is_terminal(order.state) or order.lease_owner is not None:
                    await self._release(order, handed_back=stopped)
            finally:
                # Only after the release has committed: an action admitted earlier would
                # claim (re-entrantly) and then lose its lease to this release.
                self._driving.discard(order.id)
            metrics.RUN_SECONDS.observe(time.perf_counter() - started)
        return order

    async def aclose(self) -> None:
        """Stop renewing leases (the runs themselves belong to their callers)."""
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)

    # -- the loop --------------------------------------------------------------------

    async def _advance(self, order: Order) -> None:
        retried_attention = False
        while not is_terminal(order.state):
            state = OrderState(order.state)
            if state in _BEFORE_STEPS and deadlines.passed(order, self.policy):
                why = deadlines.why(order, self.policy)
                await self._fire(order, "order", OrderTrigger.DEADLINE, detail=why)
            elif state is OrderState.PENDING:
                await self._fire(order, "order", OrderTrigger.REQUEST_PRODUCT)
            elif state is OrderState.PRODUCT_REQUESTED:
                if not await self._look_up_product(order):
                    return
            elif state is OrderState.STEPS_RUNNING:
                if not deadlines.passed(order, self.policy):
                    await self._each_step(order, self._forward, ALL_STEPS)
                states = _step_states(order)
                unfinished = any(st is not StepState.SUCCEEDED for st in states.values())
                if unfinished and deadlines.passed(order, self.policy):
                    await self._stop_waiting(order)
                    continue
                if StepState.REQUESTED in states.values():
                    return  # budget of this run spent; a later resume continues
                trigger = decide(states)
                await self._fire(order, "order", trigger, detail={"steps": order.step_states()})
            elif state in (OrderState.COMPENSATING, OrderState.CANCELLING):
                steps = to_compensate(_step_states(order))
                failures = [r for r in await self._each_step(order, self._compensate, steps) if r]
                if failures:
                    outage = all(f.outage for f in failures)
                    await self._park(order, "; ".join(f.reason for f in failures), outage=outage)
                    return
                done = (
                    OrderTrigger.CANCELLATION_DONE
                    if state is OrderState.CANCELLING
                    else OrderTrigger.COMPENSATION_DONE
                )
                await self._fire(order, "order", done, attention_reason=None)
            elif state is OrderState.NEEDS_ATTENTION:
                if retried_attention:
                    return
                retried_attention = True
                retry = (
                    OrderTrigger.RETRY_CANCELLATION
                    if order.cancel_requested
                    else OrderTrigger.RETRY_COMPENSATION
                )
                # The park's reason ends with the park (it stays in the log): a retried
                # order is not "needs attention", and a new park gives its own.
                await self._fire(order, "order", retry, attention_reason=None)

    async def _park(self, order: Order, reason: str, *, outage: bool = False) -> None:
        """needs_attention, with the reason; the sweep retries after a doubling pause. A
        compensation past its order deadline is flagged so (never cut short); an owner's
        cancellation is not: it came after the order's outcome, which the deadline bounds.
        Parked only because its breakers stayed open (`outage`), it is retried sooner: the
        pause doubles from the run's breaker patience up to `park_min`, so an outage of a
        minute does not leave its compensations parked for `park_min` after it ends. Such
        parks have their own count, so a real failure after a long outage starts again
        from `park_min`, not from where the outage's parks had doubled to."""
        counter = "order:outage_park" if outage else "order:park"
        parks = order.attempts.get(counter, 0) + 1
        if outage:
            pause = doubling(self.policy.breaker_patience, self.policy.park_min, parks)
        else:
            pause = doubling(self.policy.park_min, self.policy.park_max, parks)
        detail: dict[str, Any] = {"reason": reason}
        if deadlines.passed(order, self.policy) and not order.cancel_requested:
            reason = f"past its order deadline: {reason}"
            detail["deadline"] = deadlines.why(order, self.policy)["deadline"]
        await self._fire(
            order,
            "order",
            OrderTrigger.PARK,
            detail=detail,
            attention_reason=reason,
            attempts={**order.attempts, counter: parks},
            next_attempt_at=utcnow() + timedelta(seconds=pause),
        )

    # -- the order's own deadline (ORDER_SAGA_ORDER_DEADLINE; fsm.deadlines) ---------

    async def _stop_waiting(self, order: Order) -> None:
        """Past the deadline during the steps: every `requested` step expires (it may have
        been applied, so it is compensated), then the order compensates (`deadline`)."""
        for step in STEP_NAMES:
            if StepState(order.state_of(step)) is StepState.REQUESTED:
                why = deadlines.why(order, self.policy)
                await self._fire(order, step, StepTrigger.EXPIRE, detail=why)
        detail = {**deadlines.why(order, self.policy), "steps": order.step_states()}
        await self._fire(order, "order", OrderTrigger.DEADLINE, detail=detail)

    async def _look_up_product(self, order: Order) -> bool:
        """PRODUCT_REQUESTED -> found / missing / unavailable; False if still unknown."""
        lookup_deadline = deadlines.of_product_lookup(order, self.policy)
        stop = deadlines.of_order(order, self.policy)
        try:
            product = await self._attempts.call(
                order,
                "product:get",
                lambda: self.services.product.get(order.product_id),
                deadline=deadlines.earliest(lookup_deadline, stop),
            )
        except NotFound as exc:
            await self._fire(order, "order", OrderTrigger.PRODUCT_MISSING, detail=exc.detail())
            return True
        except CallFailure as exc:
            if deadlines.passed(order, self.policy):  # it stops waiting for the product
                why = deadlines.why(order, self.policy)
                await self._fire(order, "order", OrderTrigger.DEADLINE, detail=why)
                return True
            expired = utcnow() >= lookup_deadline
            if isinstance(exc, BusinessFailure) or expired:
                trigger = OrderTrigger.PRODUCT_UNAVAILABLE
                await self._fire(order, "order", trigger, detail=exc.detail())
                return True
            return False
        if deadlines.passed(order, self.policy):  # found, too late: no step is started
            why = deadlines.why(order, self.policy)
            await self._fire(order, "order", OrderTrigger.DEADLINE, detail=why)
            return True
        price = product.get("price")
        amount = price * order.quantity if _is_price(price) else None
        if amount is None or amount > MAX_AMOUNT:  # past it, the amount column cannot hold it
            detail = {"error": "invalid_product", "product": product}
            await self._fire(order, "order", OrderTrigger.PRODUCT_UNAVAILABLE, detail=detail)
            return True
        deadline = utcnow() + timedelta(seconds=self.policy.step_deadline)
        await self._fire(
            order,
            "order",
            OrderTrigger.PRODUCT_FOUND,
            detail={"product": product},
            amount=amount,
            deadline_at=deadline,
        )
        return True

    # -- one step forward, one step back ---------------------------------------------

    async def _forward(self, order: Order, step: Step) -> None:
        saga_step = self.steps[step]
        state = StepState(order.state_of(step))
        resumed = state is StepState.REQUESTED  # a previous run may have sent it already
        if state is StepState.PENDING:
            if deadlines.passed(order, self.policy):
                return  # never started: nothing to undo (the join stops waiting)
            await self._fire(order, step, StepTrigger.REQUEST)  # intent, before the call
        elif not resumed:
            return
        # Past the order's deadline the call stops being retried: the join expires it.
        deadline = deadlines.of_forward_call(order, self.policy)
        try:
            answer = await self._forward_answer(order, step, resumed=resumed, deadline=deadline)
        except BusinessFailure as exc:
            await self._fire(order, step, StepTrigger.FAIL, detail=exc.detail())
            return
        except TransientFailure as exc:
            if order.deadline_at is not None and utcnow() >= order.deadline_at:
                await self._fire(order, step, StepTrigger.EXPIRE, detail=exc.detail())
            return
        changes = saga_step.forward_changes(answer)
        await self._fire(order, step, StepTrigger.SUCCEED, detail=answer, **changes)

    async def _forward_answer(
        self, order: Order, step: Step, *, resumed: bool, deadline: datetime | None
    ) -> Answer:
        """The forward call's answer, reconciled with what the service holds under its key
        whenever an earlier attempt may have been applied: the step was resumed from
        `requested`, or an attempt of this call had an unknown outcome. Then a 4xx is a
        definite "no" only if the service holds it for the key (a gateway's 401/403 or a
        409 "in progress" is not the service's answer): the stored success is the answer,
        a stored failure raises BusinessFailure, and nothing stored leaves the outcome
        unknown (TransientFailure: the step stays `requested`, is retried, or expires past
        its deadline and is compensated). A fresh request's first 4xx costs no lookup."""
        saga_step = self.steps[step]
        key = idempotency_key(order, step, STEP[step].forward)
        call = f"{step}:{STEP[step].forward}"

        def held() -> Awaitable[Answer | None]:
            lookup = partial(saga_step.service.lookup, key)
            return self._attempts.call(order, f"{step}:lookup", lookup, deadline=deadline)

        if resumed and (answer := await held()) is not None:
            return answer
        forward = partial(saga_step.forward, order, key)
        before = order.attempts.get(call, 0)  # earlier runs' failed attempts
        try:
            return await self._attempts.call(order, call, forward, deadline=deadline)
        except BusinessFailure as no:
            if not resumed and order.attempts.get(call, 0) == 0:
                raise  # the first answer to a fresh request: a definite "no"
            answer = await held()  # a stored "no" raises BusinessFailure here
            if answer is None:
                unknown = f"{no}; nothing stored under its key: outcome unknown"
                exc = TransientFailure(unknown, status=no.status, body=no.body)
                await self._attempts.gave_up(order, call, exc, before=before)
                raise exc from no
            return answer

    async def _compensate(self, order: Order, step: Step) -> Unfinished | None:
        """Undo a step that may have had an effect; says why if it must wait."""
        saga_step = self.steps[step]
        if StepState(order.state_of(step)) is not StepState.COMPENSATING:
            await self._fire(order, step, StepTrigger.COMPENSATE)
        action = STEP[step].undo
        key = idempotency_key(order, step, action)
        try:
            answer = await self._attempts.call(
                order,
                f"{step}:{action}",
                lambda: saga_step.undo(order, key),
                deadline=None,  # retried until it succeeds, over as many runs as it takes
                patience=self.policy.breaker_patience,  # but this run ends: it parks
            )
        except BreakerWaitOver as exc:  # the run ends; a later one retries it
            waiting = f"compensation {step} {action} waiting on the breaker of {exc.service}"
            return Unfinished(f"{waiting}: parked ({exc})", outage=True)
        except CallFailure as exc:
            # Never skipped: the order parks in needs_attention and a resume retries it.
            return Unfinished(f"{step} {action} did not succeed: {exc}", outage=False)
        changes = saga_step.undo_changes()
        await self._fire(order, step, StepTrigger.FINISH_COMPENSATION, detail=answer, **changes)
        return None

    # -- plumbing --------------------------------------------------------------------

    async def _each_step(
        self,
        order: Order,
        fn: Callable[[Order, Step], Coroutine[Any, Any, T]],
        steps: Collection[Step],
    ) -> list[T]:
        """Run `fn` for the steps concurrently (SPEC §1: one failing does not stop the
        others). An error (lease lost, stale write) cancels the siblings and is re-raised
        as itself, not as an ExceptionGroup, so callers can catch it by type."""
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(fn(order, step)) for step in STEP_NAMES if step in steps]
        except BaseExceptionGroup as errors:
            raise errors.exceptions[0] from errors
        return [task.result() for task in tasks]

    async def _fire(
        self,
        order: Order,
        scope: str,
        trigger: str,
        *,
        detail: dict[str, Any] | None = None,
        **changes: Any,
    ) -> None:
        reason = detail.get("reason") if detail else None
        with events.transition(order, scope, trigger, reason=reason):  # one line per transition
            await self.store.record_transition(
                order=order,
                owner=self.owner,
                scope=scope,
                trigger=trigger,
                detail=detail,
                **changes,
            )
        metrics.transition(scope, trigger).inc()
        if self.crash_after == f"{scope}:{trigger}":
            os.kill(os.getpid(), signal.SIGKILL)  # test hook: die right after the commit

    async def _keep_leases(self) -> None:
        """Renew every lease this executor holds, one statement per interval."""
        interval = self.store.lease.total_seconds() / 3
        while self._driving:
            await asyncio.sleep(interval)
            try:
                await self.store.renew(order_ids=list(self._driving), owner=self.owner)
            except Exception as exc:  # a lost lease shows at the next guarded write
                log.warning("could not renew leases: %s", exc)

    async def _release(self, order: Order, *, handed_back: bool = False) -> None:
        try:
            await self.store.release(
                order_id=order.id, owner=self.owner, version=order.version, handed_back=handed_back
            )
            order.lease_owner = order.lease_expires_at = None
        except Exception as exc:  # the lease expires on its own
            log.warning("could not release order %s: %s", order.id, exc)

    async def _reload(self, order: Order) -> None:
        try:
            fresh = await asyncio.to_thread(self.store.get, order.id)
        except Exception:
            return  # the database is down too: the sweep sorts it out later
        for field in dataclasses.fields(Order):
            setattr(order, field.name, getattr(fresh, field.name))


def _step_states(order: Order) -> dict[Step, StepState]:
    return {step: StepState(order.state_of(step)) for step in STEP_NAMES}


def _is_price(value: Any) -> TypeGuard[int]:
    """A price in cents: a whole number, not negative (JSON true is no price)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
