"""SPEC §3 "two executors never drive the same order at the same time": real `order-saga`
processes racing for the same stuck orders, on SQLite and PostgreSQL. Whoever wins each
order, it is driven exactly once: one intent per step, one effect per forward key, and
money and stock move by exactly the orders placed."""

from __future__ import annotations

import re
import signal
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from alembic import command as alembic_command

from downstream.seed import RICH_USER_ID, WIDGET_ID
from fsm.machine import AUDIT_SCOPE
from fsm.migrate import alembic_config
from fsm.store import Store, utcnow
from order_saga.orders_cli import LOCAL_ADMIN
from tests.support.api import WIDGET_PRICE
from tests.support.database import stuck_orders, triggers_by_scope
from tests.support.processes import (
    FORWARD_ACTIONS,
    Result,
    Saga,
    command,
    pause_between_transactions,
)
from tests.support.services import (
    Books,
    Downstream,
    Fault,
    answers,
    assert_conserved,
    free_port,
    set_faults,
)
from tests.support.settings import saga_env
from tests.support.waiting import past, wait_until

ONE_RUN = {  # the log of an order completed by a single driver
    "order": Counter(request_product=1, product_found=1, all_succeeded=1),
    **{step: Counter(request=1, succeed=1) for step in FORWARD_ACTIONS},
}


def resumed_count(result: Result) -> int:
    """`resumed N, completed N, ...`: the summary is the last line `resume` prints."""
    lines = result.stdout.strip().splitlines()
    match = re.match(r"resumed (\d+),", lines[-1]) if lines else None
    assert match, result.explain()
    return int(match.group(1))


def held_elsewhere(result: Result) -> int:
    """The orders `resume` left to another driver: skipped as leased, or lost mid-run
    (`resume` exits 4 when there are any: it did not drive them to the end itself)."""
    lines = result.stdout.strip().splitlines()
    skipped = re.search(r"skipped \(leased elsewhere\) (\d+)", lines[-1]) if lines else None
    lost = re.search(r"lost to another driver (\d+)", lines[-1]) if lines else None
    assert skipped, result.explain()
    return int(skipped.group(1)) + (int(lost.group(1)) if lost else 0)


def assert_each_driven_once(
    store: Store, downstream: Downstream, books: Books, ids: list[uuid.UUID]
) -> None:
    orders = [store.get(oid) for oid in ids]
    assert Counter(o.status for o in orders) == Counter(completed=len(ids))
    assert all(o.lease_owner is None for o in orders)
    for oid in ids:
        # the machine's moves: one run's; a manual `resume` also writes who resumed it
        # (scope AUDIT_SCOPE, not a move), once per driver that claimed the order
        moves = triggers_by_scope(store, oid)
        audit = moves.pop(AUDIT_SCOPE, Counter())
        assert moves == ONE_RUN, store.history(oid)
        assert set(audit) <= {"resume"}, store.history(oid)
    forward = {f"{oid}:{step}:{action}" for oid in ids for step, action in FORWARD_ACTIONS.items()}
    assert len(forward) == 3 * len(ids)
    assert downstream.effects() == dict.fromkeys(forward, 1)  # once each, nothing else
    assert (
        downstream.balance(RICH_USER_ID) == books.balances[RICH_USER_ID] - len(ids) * WIDGET_PRICE
    )
    assert downstream.stock(WIDGET_ID) == books.stocks[WIDGET_ID] - len(ids)
    assert_conserved(downstream, books, orders)


@pytest.mark.slow
def test_two_resumers_race_for_the_same_stuck_orders(
    db_url: str, store: Store, downstream: Downstream
) -> None:
    books = Books.read(downstream, users=[RICH_USER_ID], products=[WIDGET_ID])
    ids = stuck_orders(store, 100, user_id=RICH_USER_ID, product_id=WIDGET_ID, quantity=1)
    env = saga_env(database_url=db_url, services_url=downstream.url)

    argv = command("resume", "--older-than", "0", "--limit", "1000")
    racers = [Saga(argv, env), Saga(argv, env)]  # started together, neither waits
    results = [racer.wait(timeout=180) for racer in racers]

    for result in results:  # the one that met the other's leases says so
        assert result.returncode == (4 if held_elsewhere(result) else 0), result.explain()
    counts = [resumed_count(r) for r in results]
    print(f"resumed per process: {counts}")
    assert sum(counts) == 100, [r.stdout[-300:] for r in results]
    assert_each_driven_once(store, downstream, books, ids)
    for oid in ids:  # claimed by one resumer only: one audit row, naming the local admin
        (row,) = [t for t in store.history(oid) if t.scope == AUDIT_SCOPE]
        assert row.detail is not None and row.detail["by"] == LOCAL_ADMIN


@pytest.mark.slow
def test_two_workers_share_the_stuck_orders(
    db_url: str, store: Store, downstream: Downstream
) -> None:
    books = Books.read(downstream, users=[RICH_USER_ID], products=[WIDGET_ID])
    ids = stuck_orders(store, 50, user_id=RICH_USER_ID, product_id=WIDGET_ID, quantity=1)
    env = saga_env(database_url=db_url, services_url=downstream.url)

    argv = command("worker", "--interval", "0.2", "--older-than", "0")
    workers = [Saga(argv, env), Saga(argv, env)]
    try:
        wait_until(
            lambda: all(
                o.status == "completed" and o.lease_owner is None
                for o in (store.get(oid) for oid in ids)
            ),
            120,
            what="every order completed and released",
            alive=lambda: all(w.running() for w in workers),
            interval=0.25,
        )
        # Not a synchronisation: idle time IS the test here. The workers sweep every 0.2 s;
        # a few more sweeps over finished orders must change nothing.
        time.sleep(0.5)
    finally:
        results = [w.stop() for w in workers]
    for result in results:
        assert "Traceback" not in result.stderr, result.explain()
    assert_each_driven_once(store, downstream, books, ids)


@pytest.mark.slow
def test_a_frozen_driver_loses_its_orders_and_cannot_write_after_waking(
    db_url: str, store: Store, downstream: Downstream
) -> None:
    """SPEC §3 "a stale writer's transition is rejected, not merged": driver A freezes
    (SIGSTOP) with payments in flight, its leases run out, driver B takes every order over
    and completes it; A wakes up, and every write it attempts is refused."""
    books = Books.read(downstream, users=[RICH_USER_ID], products=[WIDGET_ID])
    ids = stuck_orders(store, 20, user_id=RICH_USER_ID, product_id=WIDGET_ID, quantity=1)
    # A's first deductions hang 4 s in the service: A is waiting on them when frozen.
    set_faults(downstream.url, [Fault("user.deduct", "delay", count=8, seconds=4.0)])
    env = saga_env(database_url=db_url, services_url=downstream.url)
    argv = command("resume", "--older-than", "0", "--limit", "1000")

    # A drives 8 at a time, so 12 orders are still unclaimed when it freezes.
    a = Saga(argv, {**env, "ORDER_SAGA_LEASE_SECONDS": "3", "ORDER_SAGA_SWEEP_CONCURRENCY": "8"})
    try:

        def waiting_on_payments() -> int:
            waiting = [
                o
                for o in (store.get(oid) for oid in ids)
                if o.payment_state == "requested"
                and o.inventory_state == o.shipping_state == "succeeded"
            ]
            return len(waiting) if len(waiting) >= 8 else 0  # all of A's concurrency

        held = wait_until(waiting_on_payments, what="A's payments in flight", alive=a.running)
        pause_between_transactions(a, db_url)

        expiry = max(
            o.lease_expires_at
            for o in (store.get(oid) for oid in ids)
            if o.lease_expires_at is not None
        )
        wait_until(past(expiry, utcnow), what="A's leases to run out")
        b = Saga(argv, env).wait(timeout=120)
        assert b.returncode == 0, b.explain()
        assert resumed_count(b) == 20, b.explain()
        assert_each_driven_once(store, downstream, books, ids)
        versions = {oid: store.get(oid).version for oid in ids}
    except BaseException:
        a.process.kill()  # never leave a driver behind to write into the next test
        a.wait()
        raise
    finally:
        a.process.send_signal(signal.SIGCONT)
    woken = a.wait(timeout=60)

    # A noticed it lost every order it held and changed nothing: not one row, not one
    # effect; the orders it had not claimed yet were done by B, so nothing is left for A.
    assert woken.returncode == 4, woken.explain()  # orders it took were driven by another
    assert f"lost to another driver {held}" in woken.stdout, woken.explain()
    assert resumed_count(woken) == 0
    assert {oid: store.get(oid).version for oid in ids} == versions
    assert_each_driven_once(store, downstream, books, ids)


@pytest.mark.slow
def test_serve_workers_share_the_port_and_race_for_the_same_orders(
    db_url: str, store: Store, downstream: Downstream
) -> None:
    """`serve --workers 2`: two processes on one port, each with its own engine and
    sweeper, both sweeping every 0.1 s with no age threshold, so each sweep also races
    for the orders being placed over HTTP at that moment. Every order, stuck or placed,
    is driven exactly once."""
    books = Books.read(downstream, users=[RICH_USER_ID], products=[WIDGET_ID])
    ids = stuck_orders(store, 40, user_id=RICH_USER_ID, product_id=WIDGET_ID, quantity=1)
    # The fixture made the schema from the models; serve migrates: mark it as current.
    alembic_command.stamp(alembic_config(db_url), "head")
    env = saga_env(
        database_url=db_url,
        services_url=downstream.url,
        sweep_interval=0.1,
        sweep_older_than=0,
    )
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    served = Saga(command("serve", "--port", str(port), "--workers", "2"), env)
    try:
        wait_until(
            lambda: answers(f"{base}/healthz"),
            60,
            what="serve --workers 2 to answer",
            alive=served.running,
            explain=lambda: served.stop().explain(),
        )
        order = {"user_id": RICH_USER_ID, "product_id": WIDGET_ID, "quantity": 1}

        def place(_: int) -> httpx.Response:
            return httpx.post(f"{base}/orders", json=order, timeout=60)

        with ThreadPoolExecutor(8) as pool:
            answered = list(pool.map(place, range(24)))
        assert [a.status_code for a in answered] == [201] * 24, [a.text for a in answered]
        placed = [uuid.UUID(a.json()["id"]) for a in answered]
        wait_until(
            lambda: all(
                o.status == "completed" and o.lease_owner is None
                for o in (store.get(oid) for oid in ids + placed)
            ),
            120,
            what="every order completed and released",
            alive=served.running,
            interval=0.25,
        )
    finally:
        result = served.stop()
    assert result.returncode == 0, result.explain()
    assert "Traceback" not in result.stderr, result.explain()
    started = set(re.findall(r"Started server process \[(\d+)\]", result.stderr))
    assert len(started) == 2, result.explain()  # two processes, one port
    assert_each_driven_once(store, downstream, books, ids + placed)
