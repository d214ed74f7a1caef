"""`fsm.why`: every way a non-terminal order can stand still, produced for real (executor,
reference services, circuit breakers, leases) on SQLite and PostgreSQL, and explained by
the one function the API, the console and the CLI share. Failed attempts and breaker
waits are logged beside the transitions, never as transitions."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from downstream.seed import ORDINARY_USER_ID, SOLD_OUT_PRODUCT_ID, WIDGET_ID
from fsm import queries, why
from fsm.breaker import Breakers
from fsm.clients import Services
from fsm.executor import Executor
from fsm.machine import OrderTrigger
from fsm.models import Order
from fsm.settings import Settings
from fsm.store import Store, utcnow
from fsm.why import Kind
from fsm.wiring import build_executor, build_store
from tests.support.services import Downstream, set_faults
from tests.support.settings import saga_settings
from tests.support.waiting import wait_until_async


@pytest.fixture
def settings(db_url: str) -> Settings:
    # A long final pause (backoff_max) so "next attempt" is still ahead when read.
    return saga_settings(db_url, max_attempts=2, backoff_max=30, sweep_older_than=30)


@pytest.fixture
async def driver(settings: Settings, store: Store, services: Services) -> AsyncIterator[Executor]:
    executor = build_executor(settings, store=store, services=services)
    yield executor
    await executor.aclose()


async def new_order(store: Store, product: int = WIDGET_ID) -> Order:
    order, _ = await store.create_order(user_id=ORDINARY_USER_ID, product_id=product, quantity=1)
    return order


def explain(store: Store, order: Order, settings: Settings) -> why.Why:
    found = why.for_order(store, store.get(order.id), settings)
    assert found is not None, "a non-terminal order always has a why"
    return found


async def test_a_failing_call_waits_for_its_next_attempt(
    store: Store, driver: Executor, settings: Settings, downstream: Downstream
) -> None:
    downstream.fault("user.deduct", "error", count=1000)
    order = await driver.run((await new_order(store)).id)  # the run's budget spent
    assert order.payment_state == "requested"
    w = explain(store, order, settings)
    assert w.kind is Kind.NEXT_ATTEMPT and w.call == "payment:deduct"
    assert (w.failed_attempts, w.max_attempts) == (2, 2) and "500" in (w.last_error or "")
    stored = store.get(order.id)
    assert stored.next_attempt_at is not None and w.until is not None
    # not before the sweep may take it: still for SWEEP_OLDER_THAN, then due
    assert w.until == max(stored.next_attempt_at, stored.updated_at + timedelta(seconds=30))
    assert "next attempt of payment:deduct" in w.summary
    assert "2 attempts failed so far, at most 2 per run" in w.summary
    tried = queries.attempts(store, order.id)  # the timeline's entries, not transitions
    assert [(a.call, a.attempt) for a in tried] == [("payment:deduct", 1), ("payment:deduct", 2)]
    assert not any(t.trigger == "attempt" for t in store.history(order.id))
    set_faults(downstream.url, ())


async def test_a_resumed_runs_failed_attempts_count_this_run_and_all_runs(
    store: Store,
    driver: Executor,
    settings: Settings,
    downstream: Downstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """MAX_ATTEMPTS is a budget per run while the order counts every run's failures: a
    resumed run's lines say both ("attempt 1 of 2 this run (3 in all)"), never "attempt 3
    of 2", and `why` does not set the total against the per-run budget either."""
    caplog.set_level(logging.WARNING, logger="order_saga.events")
    downstream.fault("user.deduct", "error", count=1000)
    order = await driver.run((await new_order(store)).id)  # attempts 1, 2
    order = await driver.run(order.id)  # resumed (`resume`, the sweep): attempts 3, 4
    set_faults(downstream.url, ())
    failed = [
        r
        for r in caplog.records
        if getattr(r, "event", None) == "attempt_failed" and r.order_id == str(order.id)  # type: ignore[attr-defined]
    ]
    counted = [(r.run_attempt, r.attempt, r.max_attempts) for r in failed]  # type: ignore[attr-defined]
    assert counted == [(1, 1, 2), (2, 2, 2), (1, 3, 2), (2, 4, 2)]
    said = [r.getMessage() for r in failed]
    assert "payment:deduct attempt 1 of 2 this run failed: " in said[0]
    assert "payment:deduct attempt 2 of 2 this run failed: " in said[1]
    assert "payment:deduct attempt 1 of 2 this run (3 in all) failed: " in said[2]
    assert "payment:deduct attempt 2 of 2 this run (4 in all) failed: " in said[3]
    assert said[3].endswith("; this run gives up")
    w = explain(store, order, settings)
    assert w.kind is Kind.NEXT_ATTEMPT and (w.failed_attempts, w.max_attempts) == (4, 2)
    assert "(4 attempts failed so far, at most 2 per run; last error: " in w.summary


async def test_a_call_resumed_after_its_failed_attempts_is_in_flight_not_waiting(
    store: Store, driver: Executor, settings: Settings, downstream: Downstream
) -> None:
    """A run spent its budget (next attempt in BACKOFF_MAX), then a resume calls again at
    once: while that call is in flight the order is being driven, not "waiting for its
    next attempt at" the last run's retry time (which the new run's claim used to keep)."""
    downstream.fault("user.deduct", "error", count=2)
    order = await driver.run((await new_order(store)).id)
    assert explain(store, order, settings).kind is Kind.NEXT_ATTEMPT
    downstream.fault("user.deduct", "delay", count=1, seconds=0.8)  # answered in time
    run = asyncio.create_task(driver.run(order.id))  # `resume --order`, the page's Resume
    try:

        def in_flight() -> why.Why | None:
            assert not run.done(), "the call ended without ever showing as driven"
            w = explain(store, order, settings)
            return w if w.kind is Kind.LEASED else None

        w = await wait_until_async(in_flight, what="the resumed call to show as driven")
        assert w.owner == driver.owner and "next attempt" not in w.summary
        assert store.get(order.id).next_attempt_at is None  # the run spent it
        assert (await run).state == "completed"
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        set_faults(downstream.url, ())


async def test_a_parked_order_says_why_and_when_the_sweep_retries(
    store: Store, driver: Executor, settings: Settings, downstream: Downstream
) -> None:
    downstream.fault("user.refund", "error", count=1000)
    order = await driver.run((await new_order(store, SOLD_OUT_PRODUCT_ID)).id)
    set_faults(downstream.url, ())
    assert order.state == "needs_attention"
    w = explain(store, order, settings)
    stored = store.get(order.id)
    assert w.kind is Kind.PARKED and w.reason == stored.attention_reason
    assert "payment refund did not succeed" in w.summary
    assert stored.next_attempt_at is not None  # the park's own pause (PARK_MIN) is later
    assert w.until == max(stored.next_attempt_at, stored.updated_at + timedelta(seconds=30))
    later = settings.model_copy(update={"sweep_older_than": 10_000.0})  # the real setting
    assert explain(store, order, later).until == stored.updated_at + timedelta(seconds=10_000)


async def test_a_lease_whose_owner_stopped_renewing_is_expired(
    db_url: str, store: Store, settings: Settings
) -> None:
    order = await new_order(store)
    short = build_store(saga_settings(db_url, lease_seconds=0.2))
    try:
        assert await store.claim(order_id=order.id, owner="host-a:4242:dead") is not None
        live = explain(store, order, settings)  # a 30 s lease, renewed while it runs
        assert live.kind is Kind.LEASED and live.owner == "host-a:4242:dead"
        # the same owner claims again with a short lease, then never renews it
        claimed = await short.claim(order_id=order.id, owner="host-a:4242:dead")
        assert claimed is not None and claimed.lease_expires_at is not None
        expiry = claimed.lease_expires_at
        await wait_until_async(lambda: utcnow() > expiry, what="the lease to run out")
        w = explain(store, order, settings)
        assert w.kind is Kind.LEASE_EXPIRED and w.owner == "host-a:4242:dead"
        assert w.lease_expires_at == claimed.lease_expires_at
        assert "expired" in w.summary and "host-a:4242:dead" in w.summary
    finally:
        short.close()
        short.engine.dispose()


async def test_a_parked_order_under_a_live_lease_is_being_acted_on(
    store: Store, driver: Executor, settings: Settings, downstream: Downstream
) -> None:
    """Between a Retry's (or a resolve's) claim and its first move the order is still
    parked: it said "next attempt of payment:refund at <the park's pause>, driven by ..."."""
    downstream.fault("user.refund", "error", count=1000)
    order = await driver.run((await new_order(store, SOLD_OUT_PRODUCT_ID)).id)
    set_faults(downstream.url, ())
    assert order.state == "needs_attention" and order.next_attempt_at is not None
    assert await store.claim(order_id=order.id, owner="host-c:9:acting") is not None
    w = explain(store, order, settings)
    assert w.kind is Kind.LEASED and w.owner == "host-c:9:acting", w
    assert "next attempt" not in w.summary


async def test_a_retry_killed_mid_run_waits_for_its_lease_not_the_park_pause(
    db_url: str, store: Store, driver: Executor, settings: Settings, downstream: Downstream
) -> None:
    """An operator's Retry in another process fires retry_compensation, then is killed -9
    during the refund: the order says its owner's lease expired and the sweep takes it over
    then (the README's fault table), not "next attempt of payment:refund" at the end of the
    park's pause (PARK_MIN, minutes) it no longer waits for."""
    short = build_store(saga_settings(db_url, lease_seconds=0.2))
    dead = "host-b:77:dead"
    due = settings.model_copy(update={"sweep_older_than": 0.0})
    try:
        for starts_the_run in (False, True):  # a run of the previous release; of this one
            downstream.fault("user.refund", "error", count=1000)
            order = await driver.run((await new_order(store, SOLD_OUT_PRODUCT_ID)).id)
            set_faults(downstream.url, ())
            assert order.state == "needs_attention" and order.next_attempt_at is not None
            pause = order.next_attempt_at
            claimed = await short.claim(order_id=order.id, owner=dead)
            assert claimed is not None and claimed.lease_expires_at is not None
            if starts_the_run:  # what Executor._drive_reserved does first
                await short.start_run(order=claimed, owner=dead)
            await short.record_transition(
                order=claimed, owner=dead, scope="order", trigger=OrderTrigger.RETRY_COMPENSATION
            )
            expiry = claimed.lease_expires_at
            await wait_until_async(lambda end=expiry: utcnow() > end, what="the lease to run out")
            w = explain(store, order, due)
            assert w.kind is Kind.LEASE_EXPIRED and w.owner == dead, w
            assert "expired" in w.summary and "next attempt" not in w.summary
            # the sweep honours a retry time the run left (the older release's), else none
            assert w.until == (expiry if starts_the_run else max(expiry, pause))
            swept = {o.id for o in store.find_stuck(moved_before=utcnow(), limit=10)}
            assert (order.id in swept) is starts_the_run
    finally:
        short.close()
        short.engine.dispose()


async def test_a_call_behind_an_open_breaker_waits_for_the_probe(
    store: Store, services: Services, settings: Settings, downstream: Downstream
) -> None:
    breakers = Breakers(threshold=1, cooldown=60)
    executor = build_executor(settings, store=store, services=breakers.wrap(services))
    downstream.fault("user.deduct", "error", count=1000)
    order = await new_order(store)
    run = asyncio.create_task(executor.run(order.id))
    try:

        def waiting() -> why.Why | None:
            assert not run.done(), run
            w = explain(store, order, settings)
            return w if w.kind is Kind.BREAKER else None

        w = await wait_until_async(waiting, what="the order to wait on the breaker")
        assert w.service == "user.deduct" and w.call == "payment:deduct"
        assert w.until is not None and w.until > utcnow() + timedelta(seconds=50)  # the probe
        assert w.owner == executor.owner and "user.deduct circuit breaker" in w.summary
        [waited] = [a for a in queries.attempts(store, order.id) if a.waiting_on]
        assert waited.waiting_on == "user.deduct"
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        await executor.aclose()
        set_faults(downstream.url, ())


async def test_a_wait_on_a_breaker_outlives_the_other_steps_finishing(
    store: Store, services: Services, settings: Settings, downstream: Downstream
) -> None:
    """Inventory and shipping answer after payment began to wait on its breaker: their
    transitions move the order past the wait's attempt row, and the wait still shows."""
    breakers = Breakers(threshold=1, cooldown=60)
    executor = build_executor(settings, store=store, services=breakers.wrap(services))
    downstream.fault("user.deduct", "error", count=1000)
    downstream.fault("inventory.deduct", "delay", seconds=0.5)
    downstream.fault("shipping.schedule", "delay", seconds=0.5)
    order = await new_order(store)
    run = asyncio.create_task(executor.run(order.id))
    try:

        def others_done() -> Order | None:
            assert not run.done(), run
            now = store.get(order.id)
            done = now.inventory_state == now.shipping_state == "succeeded"
            return now if done else None

        moved = await wait_until_async(others_done, what="inventory and shipping to succeed")
        [waited] = [a for a in queries.attempts(store, order.id) if a.waiting_on]
        assert waited.at < moved.updated_at  # the order moved after the wait began
        w = explain(store, order, settings)
        assert w.kind is Kind.BREAKER and w.service == "user.deduct", w
        assert w.call == "payment:deduct"
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        await executor.aclose()
        set_faults(downstream.url, ())


async def test_an_order_nobody_holds_is_runnable(store: Store, settings: Settings) -> None:
    order = await new_order(store)
    w = explain(store, order, settings)
    assert w.kind is Kind.RUNNABLE
    assert w.until == store.get(order.id).updated_at + timedelta(seconds=30)
    now = settings.model_copy(update={"sweep_older_than": 0.0})
    assert explain(store, order, now).summary.startswith("runnable now")


async def test_an_order_a_stopping_driver_handed_back_is_runnable_now(
    store: Store, settings: Settings
) -> None:
    order = await new_order(store)
    claimed = await store.claim(order_id=order.id, owner="host-a:4242:stopping")
    assert claimed is not None
    await store.release(
        order_id=order.id, owner="host-a:4242:stopping", version=claimed.version, handed_back=True
    )
    w = explain(store, order, settings)  # still for 30 s? no: the sweep's at its next pass
    assert w.kind is Kind.RUNNABLE and w.summary.startswith("runnable now"), w
    assert w.owner is None


async def test_a_breaker_wait_nobody_drives_any_more_waits_for_its_probe(
    store: Store, settings: Settings
) -> None:
    """Its driver stopped (lease given back) while the call waited on a breaker: the sweep
    skips the order until the probe time, and its why says so (before: "runnable now")."""
    order = await new_order(store)
    claimed = await store.claim(order_id=order.id, owner="host-a:1:x")
    assert claimed is not None
    probe = utcnow() + timedelta(seconds=90)
    await store.note_attempt(
        order=claimed, owner="host-a:1:x", call="payment:deduct", error=None,
        next_attempt_at=probe, waiting_on="user.deduct",
    )  # fmt: skip
    assert await store.release(order_id=order.id, owner="host-a:1:x", version=claimed.version)
    w = explain(store, order, settings)
    assert w.kind is Kind.BREAKER and w.service == "user.deduct" and w.until == probe
    assert "then the sweep drives it" in w.summary
    swept = store.find_stuck(moved_before=utcnow(), limit=10)
    assert order.id not in {o.id for o in swept}  # what the why says: not before the probe

    # The probe's time passed with the order still undriven: runnable, from then on.
    due = settings.model_copy(update={"sweep_older_than": 0.0})
    later = why.explain(
        store.get(order.id), last=None, settings=due, now=probe + timedelta(seconds=1)
    )
    assert later is not None and later.kind is Kind.RUNNABLE


async def test_a_terminal_order_needs_no_why(
    store: Store, driver: Executor, settings: Settings
) -> None:
    done = await driver.run((await new_order(store)).id)
    assert done.state == "completed"
    assert why.for_order(store, done, settings) is None


@pytest.mark.parametrize("edge", ["retry_compensation", "retry_cancellation"])
async def test_a_parked_order_being_retried_has_no_attention_reason(
    store: Store,
    driver: Executor,
    settings: Settings,
    downstream: Downstream,
    capsys: pytest.CaptureFixture[str],
    edge: str,
) -> None:
    """The park's reason belongs to the park: a retry (resume, sweep, the page's Retry)
    clears it in the same commit as the move, so a compensating or cancelling order is not
    shown "needs attention" beside "why it is here: …". The park's reason stays in the
    log. A row written before that (a stale reason) is not shown either: the API, the
    events and `orders show` give the reason only while the order is parked."""
    from fsm.outbox import order_document
    from order_saga.orders_cli import print_order

    if edge == "retry_compensation":  # row 4 (sold out), the refund down past its budget
        undo, live = "user.refund", "compensating"
        downstream.fault(undo, "error", count=1000)
        order = await driver.run((await new_order(store, SOLD_OUT_PRODUCT_ID)).id)
    else:  # the owner cancels a completed order, the shipment's cancel down
        undo, live = "shipping.cancel", "cancelling"
        completed = await driver.run((await new_order(store)).id)
        assert completed.state == "completed"
        downstream.fault(undo, "error", count=1000)
        order = await driver.cancel(completed.id)
    set_faults(downstream.url, ())
    assert order.state == "needs_attention" and order.attention_reason
    parked_reason = order.attention_reason
    assert order_document(store.get(order.id))["attention_reason"] == parked_reason

    downstream.fault(undo, "delay", count=1, seconds=0.8)  # answered, after a while
    run = asyncio.create_task(driver.run(order.id))  # `resume`, the page's Retry
    try:

        def retrying() -> Order | None:
            assert not run.done(), "the retry ended without ever showing as under way"
            stored = store.get(order.id)
            return stored if stored.state == live else None

        stored = await wait_until_async(retrying, what=f"the retry to show as {live}")
        assert stored.attention_reason is None
        assert any(t.trigger == edge for t in store.history(order.id))
        assert (await run).status in ("failed", "cancelled")
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        set_faults(downstream.url, ())
    park = [t for t in store.history(order.id) if t.trigger == "park"][-1]
    assert park.detail is not None and park.detail["reason"] == parked_reason  # kept in the log

    # A reason left on a live row (written before the retry edges cleared it): not shown.
    stale = dataclasses.replace(stored, attention_reason=parked_reason)
    assert order_document(stale)["attention_reason"] is None
    capsys.readouterr()
    because = why.explain(stale, last=None, settings=settings, now=utcnow())
    print_order(stale, store.history(order.id), as_json=False, because=because)
    shown = capsys.readouterr().out
    assert "needs attention" not in shown and "why it is here" in shown
