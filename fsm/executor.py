"""Advance one order: fire a trigger -> commit it -> call the service -> commit the outcome.

The executor owns no state between runs: everything it needs to continue is in the order
row (states, version, retry schedule) and every side effect is preceded by a committed
intent transition, so a run killed anywhere is continued by the next one (SPEC §3).
It holds the order's lease for the whole run and releases it at the end.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_any,
    wait_random_exponential,
)
from tenacity.stop import stop_base

from fsm import metrics
from fsm.clients import Answer, ReconcilingService, Services
from fsm.errors import (
    BusinessFailure,
    CallFailure,
    InvalidMove,
    LeaseLost,
    NotFound,
    TransientFailure,
)
from fsm.machine import (
    COMPENSATION_NEEDED,
    OrderState,
    OrderTrigger,
    Step,
    StepState,
    StepTrigger,
    decide,
    is_terminal,
)
from fsm.models import Order
from fsm.settings import Settings
from fsm.store import Store, step_states, utcnow

Call = Callable[[], Awaitable[Answer]]
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 4  # per call, per run
    backoff_base: float = 0.05  # seconds; full jitter, doubling
    backoff_max: float = 2.0
    step_deadline: float = 60.0  # a forward step unknown this long is treated as failed
    # A parked order is retried by the sweep after backoff_max x 2^parks, at most this.
    park_max: float = 3600.0

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(
            max_attempts=settings.max_attempts,
            backoff_base=settings.backoff_base,
            backoff_max=settings.backoff_max,
            step_deadline=settings.step_deadline,
            park_max=settings.park_max,
        )


class stop_at(stop_base):  # noqa: N801  (named like tenacity's own stop conditions)
    """Stop retrying once a wall-clock deadline (persisted on the order) has passed."""

    def __init__(self, deadline: datetime | None) -> None:
        self.deadline = deadline

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.deadline is not None and utcnow() >= self.deadline


def new_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def idempotency_key(order: Order, step: str, action: str) -> str:
    """Derived, never random: every retry, resume and process sends the same key."""
    return f"{order.id}:{step}:{action}"


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
        self.policy = policy or RetryPolicy()
        self.owner = owner or new_owner()
        # Test hook: "scope:trigger" -> SIGKILL this process right after that commit.
        self.crash_after = crash_after
        # Orders this executor is driving now. The lease is re-entrant for its owner (so a
        # crashed-and-restarted owner can continue), so a second run inside this process
        # (a resume or cancel during a background run) must be refused here.
        self._driving: set[uuid.UUID] = set()

    # -- entry points ----------------------------------------------------------------

    async def run(self, order_id: uuid.UUID) -> Order:
        """Claim the order and drive it as far as this run's retry budget allows."""
        return await self.drive(self._claim(order_id))

    def _claim(self, order_id: uuid.UUID) -> Order:
        if order_id in self._driving:
            raise LeaseLost(f"order {order_id} is being driven right now")
        order = self.store.claim(order_id=order_id, owner=self.owner)
        if order is None:
            raise LeaseLost(f"order {order_id} is being driven by another worker")
        return order

    async def cancel(self, order_id: uuid.UUID) -> Order:
        """The owner cancels a completed order: refund, restore, cancel shipping."""
        order = self._claim(order_id)
        if order.state == OrderState.COMPLETED:
            # One commit: a crash can never keep the request but lose the transition.
            self._fire(order, "order", OrderTrigger.CANCEL, cancel_requested=True)
        elif not order.cancel_requested:
            self.store.release(order_id=order.id, owner=self.owner)
            raise InvalidMove(f"only a completed order can be cancelled (it is {order.state})")
        return await self.drive(order)

    async def drive(self, order: Order) -> Order:
        """Advance an order whose lease we hold; always releases the lease."""
        if order.id in self._driving:
            raise LeaseLost(f"order {order.id} is being driven right now")
        self._driving.add(order.id)
        keeper = asyncio.create_task(self._keep_lease(order.id))
        try:
            await self._advance(order)
        finally:
            keeper.cancel()
            self._driving.discard(order.id)
            self.store.release(order_id=order.id, owner=self.owner)
            order.lease_owner = None
        return order

    # -- the loop --------------------------------------------------------------------

    async def _advance(self, order: Order) -> None:
        retried_attention = False
        while not is_terminal(order.state):
            state = OrderState(order.state)
            if state is OrderState.PENDING:
                self._fire(order, "order", OrderTrigger.REQUEST_PRODUCT)
            elif state is OrderState.PRODUCT_REQUESTED:
                if not await self._look_up_product(order):
                    return
            elif state is OrderState.STEPS_RUNNING:
                await self._each_step(order, self._forward)
                states = {s: StepState(getattr(order, f"{s}_state")) for s in Step}
                if any(st is StepState.REQUESTED for st in states.values()):
                    return  # budget of this run spent; a later resume continues
                self._fire(order, "order", decide(states), detail={"steps": step_states(order)})
            elif state in (OrderState.COMPENSATING, OrderState.CANCELLING):
                results = await self._each_step(order, self._compensate)
                failures = [reason for reason in results if reason is not None]
                if failures:
                    self._park(order, "; ".join(failures))
                    return
                done = (
                    OrderTrigger.CANCELLATION_DONE
                    if state is OrderState.CANCELLING
                    else OrderTrigger.COMPENSATION_DONE
                )
                self._fire(order, "order", done, attention_reason=None)
            elif state is OrderState.NEEDS_ATTENTION:
                if retried_attention:
                    return
                retried_attention = True
                retry = (
                    OrderTrigger.RETRY_CANCELLATION
                    if order.cancel_requested
                    else OrderTrigger.RETRY_COMPENSATION
                )
                self._fire(order, "order", retry)

    def _park(self, order: Order, reason: str) -> None:
        """needs_attention, with the reason; the sweep retries after a doubling pause."""
        parks = order.attempts.get("order:park", 0) + 1
        pause = min(self.policy.park_max, self.policy.backoff_max * 2**parks)
        self._fire(
            order,
            "order",
            OrderTrigger.PARK,
            detail={"reason": reason},
            attention_reason=reason,
            attempts={**order.attempts, "order:park": parks},
            next_attempt_at=utcnow() + timedelta(seconds=pause),
        )

    async def _look_up_product(self, order: Order) -> bool:
        """PRODUCT_REQUESTED -> found / missing / unavailable; False if still unknown."""
        call = "product:get"
        try:
            product = await self._with_retries(
                order, call, lambda: self.services.product.get(order.product_id), deadline=None
            )
        except NotFound as exc:
            self._fire(order, "order", OrderTrigger.PRODUCT_MISSING, detail=exc.detail())
            return True
        except CallFailure as exc:
            expired = utcnow() >= order.created_at + timedelta(seconds=self.policy.step_deadline)
            if isinstance(exc, BusinessFailure) or expired:
                self._fire(order, "order", OrderTrigger.PRODUCT_UNAVAILABLE, detail=exc.detail())
                return True
            return False
        price = product.get("price")
        if not isinstance(price, int) or isinstance(price, bool) or price < 0:
            self._fire(
                order,
                "order",
                OrderTrigger.PRODUCT_UNAVAILABLE,
                detail={"error": "invalid_product", "product": product},
            )
            return True
        deadline = utcnow() + timedelta(seconds=self.policy.step_deadline)
        self._fire(
            order,
            "order",
            OrderTrigger.PRODUCT_FOUND,
            detail={"product": product},
            amount=price * order.quantity,
            deadline_at=deadline,
        )
        return True

    # -- one step forward ------------------------------------------------------------

    async def _forward(self, order: Order, step: Step) -> None:
        state = StepState(getattr(order, f"{step}_state"))
        resumed = state is StepState.REQUESTED  # a previous run may have sent it already
        if state is StepState.PENDING:
            self._fire(order, step, StepTrigger.REQUEST)  # intent, committed before the call
        elif not resumed:
            return
        call = self._call(order, step, step.forward_action)
        key = idempotency_key(order, step, step.forward_action)
        service = self._service(step)
        try:
            answer = None
            if resumed:
                answer = await self._with_retries(
                    order, f"{step}:lookup", lambda: service.lookup(key), deadline=order.deadline_at
                )
            if answer is None:
                answer = await self._with_retries(
                    order, f"{step}:{step.forward_action}", call, deadline=order.deadline_at
                )
        except BusinessFailure as exc:
            self._fire(order, step, StepTrigger.FAIL, detail=exc.detail())
            return
        except TransientFailure as exc:
            if order.deadline_at is not None and utcnow() >= order.deadline_at:
                self._fire(order, step, StepTrigger.EXPIRE, detail=exc.detail())
            return
        changes: dict[str, Any] = {}
        if step is Step.SHIPPING:
            changes = {
                "shipping_address": answer.get("address"),
                "expected_delivery": answer.get("expected_delivery"),
            }
        self._fire(order, step, StepTrigger.SUCCEED, detail=answer, **changes)

    def _call(self, order: Order, step: Step, action: str) -> Call:
        """The downstream call for one step's action, with its derived idempotency key."""
        oid, key = str(order.id), idempotency_key(order, step, action)
        if step is Step.PAYMENT:  # deduct / refund
            pay = getattr(self.services.user, action)
            return lambda: pay(
                user_id=order.user_id, amount=order.amount or 0, order_id=oid, key=key
            )
        if step is Step.INVENTORY:  # deduct / restore
            stock = getattr(self.services.inventory, action)
            return lambda: stock(
                product_id=order.product_id, quantity=order.quantity, order_id=oid, key=key
            )
        if action == "schedule":
            return lambda: self.services.shipping.schedule(
                order_id=oid, user_id=order.user_id, quantity=order.quantity, key=key
            )
        return lambda: self.services.shipping.cancel(order_id=oid, key=key)

    # -- one step backward -----------------------------------------------------------

    async def _compensate(self, order: Order, step: Step) -> str | None:
        """Undo a step that may have had an effect; returns a reason if it must wait."""
        state = StepState(getattr(order, f"{step}_state"))
        if state not in COMPENSATION_NEEDED:
            return None  # never attempted, definitely failed, or already undone
        if state is not StepState.COMPENSATING:
            self._fire(order, step, StepTrigger.COMPENSATE)
        action = step.compensation_action
        try:
            answer = await self._with_retries(
                order, f"{step}:{action}", self._call(order, step, action), deadline=None
            )
        except CallFailure as exc:
            # Never skipped: the order parks in needs_attention and a resume retries it.
            return f"{step} {action} did not succeed: {exc}"
        changes: dict[str, Any] = {}
        if step is Step.SHIPPING:
            changes = {"shipping_address": None, "expected_delivery": None}
        self._fire(order, step, StepTrigger.FINISH_COMPENSATION, detail=answer, **changes)
        return None

    def _service(self, step: Step) -> ReconcilingService:
        return {
            Step.PAYMENT: self.services.user,
            Step.INVENTORY: self.services.inventory,
            Step.SHIPPING: self.services.shipping,
        }[step]

    # -- plumbing --------------------------------------------------------------------

    async def _each_step(
        self, order: Order, fn: Callable[[Order, Step], Coroutine[Any, Any, T]]
    ) -> list[T]:
        """Run `fn` for the three steps concurrently (SPEC §1: one failing does not stop
        the others). An error (lease lost, stale write) cancels the siblings and is
        re-raised as itself, not as an ExceptionGroup, so callers can catch it by type."""
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(fn(order, step)) for step in Step]
        except BaseExceptionGroup as errors:
            raise errors.exceptions[0] from errors
        return [task.result() for task in tasks]

    def _fire(
        self,
        order: Order,
        scope: str,
        trigger: str,
        *,
        detail: dict[str, Any] | None = None,
        **changes: Any,
    ) -> None:
        self.store.record_transition(
            order=order, owner=self.owner, scope=scope, trigger=trigger, detail=detail, **changes
        )
        metrics.TRANSITIONS.labels(scope=scope, trigger=trigger).inc()
        if self.crash_after == f"{scope}:{trigger}":
            os.kill(os.getpid(), signal.SIGKILL)  # test hook: die right after the commit

    async def _with_retries(
        self,
        order: Order,
        call: str,
        fn: Callable[[], Awaitable[Any]],
        *,
        deadline: datetime | None,
    ) -> Any:
        """Retry transient failures with the same key; persist every attempt's schedule."""

        def note(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            sleep = state.upcoming_sleep
            self.store.note_attempt(
                order=order,
                owner=self.owner,
                call=call,
                error=str(exc),
                next_attempt_at=utcnow() + timedelta(seconds=sleep),
            )

        retrying = AsyncRetrying(
            stop=stop_any(stop_after_attempt(self.policy.max_attempts), stop_at(deadline)),
            wait=wait_random_exponential(
                multiplier=self.policy.backoff_base, max=self.policy.backoff_max
            ),
            retry=retry_if_exception_type(TransientFailure),
            before_sleep=note,
            reraise=True,
        )
        service, _, action = call.partition(":")
        try:
            async for attempt in retrying:
                with attempt:
                    result = await fn()
        except CallFailure as exc:
            outcome = "transient" if isinstance(exc, TransientFailure) else "business"
            metrics.CALLS.labels(service=service, action=action, outcome=outcome).inc()
            if isinstance(exc, TransientFailure):
                later = utcnow() + timedelta(seconds=self.policy.backoff_max)
                self.store.note_attempt(
                    order=order, owner=self.owner, call=call, error=str(exc), next_attempt_at=later
                )
            raise
        metrics.CALLS.labels(service=service, action=action, outcome="success").inc()
        return result

    async def _keep_lease(self, order_id: uuid.UUID) -> None:
        interval = self.store.lease.total_seconds() / 3
        while True:
            await asyncio.sleep(interval)
            if not self.store.renew(order_id=order_id, owner=self.owner):
                return  # lost: the next guarded write raises LeaseLost
