"""A run cancelled mid-write (SIGTERM: `worker` and `serve` cancel their runs) gives its
lease back. A write already queued commits whether or not its caller still waits, so a
cancelled caller must learn what the database holds before it releases: otherwise it
releases at a version the order has left and the lease stays until it expires (the
`worker` SIGTERM test met this under load). Both databases."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from datetime import timedelta
from typing import Any

import pytest

from downstream.seed import RICH_USER_ID, WIDGET_ID
from fsm.executor import Executor
from fsm.machine import OrderTrigger
from fsm.models import Order
from fsm.store import Store, utcnow
from tests.support.services import Downstream
from tests.support.waiting import wait_until_async

OWNER = "host-a:1:sigterm"


async def _cancelled_at_once(coro: Coroutine[Any, Any, object]) -> None:
    """Start `coro`, let it queue its write, cancel it while the write is in flight."""
    task = asyncio.ensure_future(coro)
    await asyncio.sleep(0)  # it runs up to its first await: the write is queued
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def _new_order(store: Store) -> Order:
    return (await store.create_order(user_id=RICH_USER_ID, product_id=WIDGET_ID, quantity=1))[0]


async def test_a_write_cancelled_in_flight_keeps_the_version_it_committed(store: Store) -> None:
    order = await store.claim(order_id=(await _new_order(store)).id, owner=OWNER)
    assert order is not None
    move = store.record_transition(
        order=order, owner=OWNER, scope="order", trigger=OrderTrigger.REQUEST_PRODUCT
    )
    await _cancelled_at_once(move)
    # The release is queued after the write (same order): it must name the version the
    # write committed, so the lease really is given back.
    assert await store.release(order_id=order.id, owner=OWNER, version=order.version)
    stored = store.get(order.id)
    assert (stored.version, stored.state) == (order.version, order.state)
    assert stored.lease_owner is None


async def test_a_claim_cancelled_in_flight_gives_its_lease_back(store: Store) -> None:
    made = await _new_order(store)
    await _cancelled_at_once(store.claim(order_id=made.id, owner=OWNER))
    await store.probe()  # the writer has committed everything queued before it
    assert store.get(made.id).lease_owner is None


async def test_a_batch_claim_cancelled_in_flight_gives_its_leases_back(store: Store) -> None:
    made = [await _new_order(store) for _ in range(3)]
    claim = store.claim_batch(owner=OWNER, moved_before=utcnow(), limit=10, due_only=False)
    await _cancelled_at_once(claim)
    await store.probe()
    assert [store.get(o.id).lease_owner for o in made] == [None, None, None]


async def test_a_run_cancelled_anywhere_releases_its_lease(
    store: Store, executor: Executor, downstream: Downstream
) -> None:
    """Cancel runs at each point of their way (at once, then once the n-th write has
    committed, when the next may be in flight): each gives its lease back, and a later
    run completes the order."""
    downstream.fault("user.deduct", "delay", count=100, seconds=0.05)
    for writes in range(12):
        order = await _new_order(store)
        run = asyncio.ensure_future(executor.run(order.id))

        def written(order: Order = order, n: int = writes, run: Any = run) -> bool:
            return bool(run.done() or store.get(order.id).version >= order.version + n)

        await wait_until_async(written, what=f"write {writes} of the run", interval=0.001)
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        await store.probe()
        left = store.get(order.id)
        assert left.lease_owner is None, f"cancelled after {writes} writes in {left.state}"
        if left.status != "completed":
            assert (await executor.run(order.id)).status == "completed"


async def test_a_lease_a_cancelled_run_gives_back_is_the_sweep_s_at_once(
    store: Store, executor: Executor, downstream: Downstream
) -> None:
    """A stopped run hands its order back (nothing drives it any more): the next sweep
    takes it although it moved just now. An order released by a run that ended waits for
    SWEEP_OLDER_THAN as before, and a handed-back order's retry time still holds."""
    downstream.fault("user.deduct", "delay", count=1, seconds=30)
    stopped = await _new_order(store)
    run = asyncio.ensure_future(executor.run(stopped.id))
    await wait_until_async(
        lambda: store.get(stopped.id).payment_state == "requested", what="the call in flight"
    )
    run.cancel()
    await asyncio.gather(run, return_exceptions=True)
    ended = await _new_order(store)
    claimed = await store.claim(order_id=ended.id, owner=OWNER)
    assert claimed is not None
    assert await store.release(order_id=ended.id, owner=OWNER, version=claimed.version)
    await store.probe()

    recently = utcnow() - timedelta(seconds=30)  # the sweep's default SWEEP_OLDER_THAN
    found = store.find_stuck(moved_before=recently, limit=10)  # `resume --dry-run`'s list
    taken = await store.claim_batch(owner="host-b:2:sweep", moved_before=recently, limit=10)
    assert [o.id for o in found] == [o.id for o in taken] == [stopped.id]
