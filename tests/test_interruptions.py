"""An order whose driver keeps dying under it (DBOS's max_recovery_attempts), on SQLite and
PostgreSQL: a claim that takes over a dead driver's expired lease counts an interruption
(`orders.interruptions`), nothing else does, a transition or a person's action resets it;
at ORDER_SAGA_MAX_INTERRUPTIONS the sweep leaves the order to an operator, `why` says so,
and a person's resume drives it. The crash loop itself is real: `worker` processes killed
with kill -9 while the same call of the same order hangs."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text

from downstream.seed import RICH_USER_ID, WIDGET_ID
from fsm import why
from fsm.clients import Services
from fsm.executor import Executor
from fsm.machine import AUDIT_SCOPE, OperatorAction, OrderTrigger
from fsm.operator import Audit
from fsm.recovery import resume_stuck
from fsm.settings import Settings
from fsm.store import Store, utcnow
from fsm.why import Kind
from fsm.wiring import build_executor, open_store
from tests.support.api import api
from tests.support.database import stuck_orders, wait_for_lease_expiry
from tests.support.processes import Saga, command, run_cli
from tests.support.services import (
    HTTP,
    Books,
    Downstream,
    Fault,
    assert_conserved,
    order_effects,
    set_faults,
)
from tests.support.settings import saga_env, saga_settings
from tests.support.waiting import past, wait_until, wait_until_async

LIMIT = 2  # ORDER_SAGA_MAX_INTERRUPTIONS of the store-level tests
PERSON = Audit(OperatorAction.RESUME, {"by": "ops"}, "the OOM is fixed", channel="cli")


@pytest.fixture
def settings(db_url: str) -> Settings:
    # A lease that runs out in a moment: a "dead driver" is an owner that took it and left.
    return saga_settings(db_url, lease_seconds=0.2, max_interruptions=LIMIT)


@pytest.fixture
def short(settings: Settings) -> Iterator[Store]:
    with open_store(settings) as store:
        yield store


async def run_out(store: Store, order_id: uuid.UUID) -> None:
    """The order's lease (held by a driver that stopped renewing it) has expired."""
    expires = store.get(order_id).lease_expires_at
    if expires is not None:
        await wait_until_async(past(expires, utcnow), 10, what="the lease to run out")


async def left_by_dead_drivers(store: Store, deaths: int) -> uuid.UUID:
    """A pending order whose driver died under it `deaths` times in a row (the first
    driver placed it), every lease run out."""
    order, _ = await store.create_order(user_id=RICH_USER_ID, product_id=WIDGET_ID, quantity=1)
    await store.claim(order_id=order.id, owner="dead-0")
    for n in range(1, deaths + 1):
        await run_out(store, order.id)
        taken = await store.claim(order_id=order.id, owner=f"dead-{n}")
        assert taken is not None and taken.interruptions == n
    await run_out(store, order.id)
    return order.id


async def test_only_a_takeover_of_a_dead_driver_s_lease_counts(short: Store) -> None:
    """`claim`: over an expired lease of another owner, +1; over our own expired lease, a
    handed-back one (SIGTERM) or a free one, nothing."""
    oid = await left_by_dead_drivers(short, 1)
    assert short.get(oid).interruptions == 1
    taken = await short.claim(order_id=oid, owner="b")  # dead-1's lease ran out
    assert taken is not None and taken.interruptions == 2 == short.get(oid).interruptions
    await run_out(short, oid)
    again = await short.claim(order_id=oid, owner="b")  # our own, expired: no death
    assert again is not None and again.interruptions == 2
    await short.release(order_id=oid, owner="b", version=again.version, handed_back=True)
    after_handing_back = await short.claim(order_id=oid, owner="c")
    assert after_handing_back is not None and after_handing_back.interruptions == 2
    await short.release(order_id=oid, owner="c", version=after_handing_back.version)
    free = await short.claim(order_id=oid, owner="d")
    assert free is not None and free.interruptions == 2 == short.get(oid).interruptions


async def test_the_sweep_s_batch_claim_counts_a_dead_driver_s_lease_only(short: Store) -> None:
    dead = await left_by_dead_drivers(short, 0)  # dead-0's lease ran out
    handed_back = await left_by_dead_drivers(short, 0)
    order = short.get(handed_back)
    await short.release(
        order_id=handed_back, owner="dead-0", version=order.version, handed_back=True
    )
    free, _ = await short.create_order(user_id=RICH_USER_ID, product_id=WIDGET_ID, quantity=1)

    taken = await short.claim_batch(owner="sweep", moved_before=utcnow(), limit=10)

    assert {o.id: o.interruptions for o in taken} == {dead: 1, handed_back: 0, free.id: 0}
    assert [short.get(oid).interruptions for oid in (dead, handed_back, free.id)] == [1, 0, 0]


async def test_a_move_or_a_person_s_action_restarts_the_count(short: Store) -> None:
    oid = await left_by_dead_drivers(short, 1)
    order = await short.claim(order_id=oid, owner="b")
    assert order is not None and order.interruptions == 2
    await short.record_transition(
        order=order, owner="b", scope="order", trigger=OrderTrigger.REQUEST_PRODUCT
    )
    assert order.interruptions == 0 == short.get(oid).interruptions
    # The count is written only when it changes: a move of an order at 0 leaves the
    # column out of its UPDATE (set behind the store's back here, it stays as it is).
    with short.engine.begin() as conn:
        conn.execute(text("UPDATE orders SET interruptions = 7"))
    await short.record_transition(order=order, owner="b", scope="payment", trigger="request")
    assert short.get(oid).interruptions == 7
    order.interruptions = 7  # as a claim would have read it
    await short.record_audit(order=order, owner="b", action="resume", detail={"by": "ops"})
    assert short.get(oid).interruptions == 0


async def test_the_sweep_leaves_an_order_at_the_limit_and_a_person_s_claim_takes_it(
    short: Store,
) -> None:
    at_limit = await left_by_dead_drivers(short, LIMIT)
    below = await left_by_dead_drivers(short, LIMIT - 1)

    swept = await short.claim_batch(owner="sweep", moved_before=utcnow(), limit=10)
    # The one below is taken, and this takeover is its LIMIT-th: the executor holds it.
    assert [(o.id, o.interruptions) for o in swept] == [(below, LIMIT)]
    assert short.get(at_limit).lease_owner == "dead-2"  # untouched

    drain = await short.claim_batch(owner="ops", moved_before=utcnow(), limit=10, due_only=False)
    assert drain == []  # a person's bulk resume leaves it too, unless told to take it
    person = await short.claim_batch(
        owner="ops", moved_before=utcnow(), limit=10, due_only=False, take_held=True
    )
    assert [o.id for o in person] == [at_limit]


async def test_zero_means_never_held(db_url: str) -> None:
    with open_store(saga_settings(db_url, lease_seconds=0.2, max_interruptions=0)) as store:
        oid = await left_by_dead_drivers(store, 3)
        swept = await store.claim_batch(owner="sweep", moved_before=utcnow(), limit=10)
    assert [(o.id, o.interruptions) for o in swept] == [(oid, 4)]


@pytest.fixture
async def driver(settings: Settings, short: Store, services: Services) -> AsyncIterator[Executor]:
    executor = build_executor(settings, store=short, services=services)
    yield executor
    await executor.aclose()


async def test_the_sweep_gives_a_held_order_back_undriven_and_a_person_s_resume_drives_it(
    short: Store,
    driver: Executor,
    settings: Settings,
    downstream: Downstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="order_saga.executor")
    oid = await left_by_dead_drivers(short, LIMIT - 1)
    version = short.get(oid).version
    counted = REGISTRY.get_sample_value("order_saga_held_orders_total")

    summary = await resume_stuck(store=short, executor=driver, older_than=0, limit=10)

    assert (summary.found, summary.resumed, summary.held) == (1, 0, 1)
    assert "held for an operator 1" in summary.line()
    assert REGISTRY.get_sample_value("order_saga_held_orders_total") == (counted or 0) + 1
    order = short.get(oid)
    assert (order.state, order.version, order.lease_owner) == ("pending", version, None)
    assert order.interruptions == LIMIT
    (line,) = [r.getMessage() for r in caplog.records if "held" in r.getMessage()]
    assert str(oid) in line and f"{LIMIT} interruptions in a row" in line
    assert f"order-saga resume --order {oid}" in line
    explained = why.for_order(short, order, settings)
    assert explained is not None and explained.kind is Kind.HELD
    assert explained.summary.startswith(
        f"held after {LIMIT} interruptions in a row: its driver died each time; "
        "resume it once the cause is fixed"
    )
    assert explained.interruptions == LIMIT
    again = await resume_stuck(store=short, executor=driver, older_than=0, limit=10)
    assert again.found == 0  # held: the next sweep does not take it

    done = await driver.run(oid, audit=PERSON)

    assert done.status == "completed" and short.get(oid).interruptions == 0
    assert [t.trigger for t in short.history(oid) if t.scope == AUDIT_SCOPE] == ["resume"]
    assert set(order_effects(downstream.effects(), oid).values()) == {1}


# -- the crash loop, for real -------------------------------------------------------------

CRASHES = 3  # ORDER_SAGA_MAX_INTERRUPTIONS of the worker processes


def deduct_calls(downstream: Downstream, queued: int) -> int:
    """Calls of user.deduct the service has seen: each takes one of the `queued` faults."""
    left = [f["count"] for f in downstream.get("/_faults")["faults"]]
    return queued - sum(left)


@pytest.mark.slow
def test_a_crash_loop_is_held_after_the_limit_and_a_person_s_resume_finishes_it(
    db_url: str, store: Store, downstream: Downstream
) -> None:
    """The payment hangs (the service answers a 504 after 30 s, doing nothing) and the
    worker driving the order is killed (-9) while it waits, each time: as an OOM on the
    reply would. Its lease runs out, the next worker takes the order over and dies at the
    same call. After CRASHES deaths with no move between, the next worker gives it back
    undriven and says so; its later sweeps leave it (they drive a new order meanwhile) and
    the service sees no more calls; an operator's resume then completes it, once."""
    books = Books.read(downstream, users=[RICH_USER_ID], products=[WIDGET_ID])
    queued = 50
    set_faults(downstream.url, [Fault("user.deduct", "timeout", count=queued, seconds=30)])
    (oid,) = stuck_orders(store, 1, user_id=RICH_USER_ID, product_id=WIDGET_ID, quantity=1)
    env = saga_env(
        database_url=db_url,
        services_url=downstream.url,
        lease_seconds=1,
        max_interruptions=CRASHES,
        http_timeout=60,  # the hang outlasts every kill
    )
    worker = command("worker", "--interval", "0.1", "--older-than", "0")

    for death in range(1, CRASHES + 1):
        with Saga(worker, env) as w:

            def in_the_call(death: int = death) -> bool:
                order = store.get(oid)
                steps = (order.inventory_state, order.shipping_state)
                called = deduct_calls(downstream, queued) == death
                return called and steps == ("succeeded", "succeeded")

            wait_until(in_the_call, 60, what=f"call {death} of user.deduct", alive=w.running)
            w.process.kill()  # kill -9 mid-call
            w.wait()
        assert store.get(oid).interruptions == death - 1  # the first driver was no takeover
        wait_for_lease_expiry(store, oid)
    held_at = store.get(oid)
    assert held_at.payment_state == "requested"

    with Saga(worker, env) as w:

        def held() -> bool:
            order = store.get(oid)
            return order.interruptions == CRASHES and order.lease_owner is None

        wait_until(held, 60, what="the order held", alive=w.running, explain=w.stderr_so_far)
        wait_until(lambda: "held" in w.stderr_so_far(), 10, what="the WARNING line")
        assert deduct_calls(downstream, queued) == CRASHES  # the holder made no call
        # The hang is over: were the order driven again, its payment would go through now.
        HTTP.delete(f"{downstream.url}/_faults").raise_for_status()
        (witness,) = stuck_orders(store, 1, user_id=RICH_USER_ID, product_id=WIDGET_ID, quantity=1)
        wait_until(
            lambda: store.get(witness).status == "completed",
            60,
            what="the next sweeps to drive a new order",
            alive=w.running,
        )
        stopped = w.stop()
    (line,) = [ln for ln in stopped.stderr.splitlines() if "interruptions in a row" in ln]
    assert str(oid) in line and f"{CRASHES} interruptions in a row" in line, line
    assert "Traceback" not in stopped.stderr, stopped.explain()
    order = store.get(oid)
    assert (order.version, order.lease_owner) == (held_at.version, None)  # not driven
    assert f"{oid}:payment:deduct" not in downstream.effects()  # nor the later sweeps
    settings = saga_settings(db_url, max_interruptions=CRASHES)
    explained = why.for_order(store, order, settings)
    assert explained is not None and explained.kind is Kind.HELD, explained
    shown = run_cli("orders", "show", str(oid), "--json", **env)
    assert json.loads(shown.stdout)["why"]["kind"] == "held", shown.stderr
    listed = run_cli("orders", "list", "--json", **env)
    rows = {row["id"]: row for row in json.loads(listed.stdout)["orders"]}
    assert rows[str(oid)]["why"]["summary"] == explained.summary

    resumed = Saga(command("resume", "--order", str(oid)), env).wait()

    assert resumed.returncode == 0, resumed.explain()
    order = store.get(oid)
    assert order.status == "completed" and order.interruptions == 0
    assert order_effects(downstream.effects(), oid) == {
        "payment:deduct": 1,
        "inventory:deduct": 1,
        "shipping:schedule": 1,
    }
    assert_conserved(downstream, books, [order, store.get(witness)])


def test_the_api_and_the_console_say_held_and_a_resume_there_drives_it(
    short: Store, db_url: str, services_url: str, downstream: Downstream
) -> None:
    oid = asyncio.run(left_by_dead_drivers(short, LIMIT))
    with api(db_url, services_url, lease_seconds=0.2, max_interruptions=LIMIT) as client:
        shown = client.get(f"/orders/{oid}").json()["why"]
        assert shown["kind"] == "held" and shown["interruptions"] == LIMIT
        assert shown["summary"].startswith(f"held after {LIMIT} interruptions in a row")
        assert f"POST /orders/{oid}/resume" in shown["summary"]
        (row,) = client.get("/orders").json()["orders"]
        assert row["why"] == shown
        page = client.get(f"/ui/orders/{oid}")
        assert page.status_code == 200
        assert 'data-kind="held"' in page.text and "Resume on its page" in page.text

        resumed = client.post(f"/orders/{oid}/resume", params={"reason": "fixed"})

        assert resumed.status_code == 200, resumed.text
        assert resumed.json()["status"] == "completed"
    assert short.get(oid).interruptions == 0
    assert set(order_effects(downstream.effects(), oid).values()) == {1}


async def test_a_bulk_resume_leaves_a_held_order_and_names_it_unless_told_to_take_it(
    db_url: str, short: Store, downstream: Downstream
) -> None:
    """A routine drain (`order-saga resume`, after an outage) drove a held order in the
    operator's own process, next to the others, without a word: the crash loop again, in
    the drain. Now it is left alone and named (the dry run says so, the run exits 4 with
    what to do); `--include-held` drives it, with the others."""
    held = await left_by_dead_drivers(short, LIMIT)
    plain, _ = await short.create_order(user_id=RICH_USER_ID, product_id=WIDGET_ID, quantity=1)
    env = saga_env(database_url=db_url, services_url=downstream.url, max_interruptions=LIMIT)
    resume = ("resume", "--older-than", "0")

    listed = await asyncio.to_thread(run_cli, *resume, "--dry-run", **env)
    assert listed.returncode == 0, listed.stderr
    (line,) = [ln for ln in listed.stdout.splitlines() if str(held) in ln]
    assert "held: left alone (find why its driver died" in line, line
    assert "would resume 1, skipped (leased elsewhere) 0, held (left alone) 1" in listed.stdout

    drained = await asyncio.to_thread(run_cli, *resume, "--json", **env)
    assert drained.returncode == 4, drained.stdout + drained.stderr
    assert short.get(plain.id).status == "completed"
    left = short.get(held)
    assert (left.state, left.interruptions) == ("pending", LIMIT)
    assert [t for t in short.history(held) if t.scope == AUDIT_SCOPE] == []  # not touched
    assert drained.stderr.strip() == (
        f"held for an operator: {held} ({LIMIT} interruptions in a row): find why its driver"
        " died, then `resume --order ID`, or all with --include-held"
    ), drained.stderr
    summary = json.loads(drained.stdout)
    assert (summary["held"], summary["held_for_operator"]) == (1, [str(held)])

    taken = await asyncio.to_thread(run_cli, *resume, "--include-held", **env)
    assert taken.returncode == 0, taken.stdout + taken.stderr
    done = short.get(held)
    assert (done.status, done.interruptions) == ("completed", 0)
    assert set(order_effects(downstream.effects(), held).values()) == {1}


async def test_metrics_count_a_held_order_while_it_lasts(
    short: Store, driver: Executor, settings: Settings
) -> None:
    """`order_saga_orders_held` (what OrderSagaHeldOrders fires on) counts live held
    orders in SQL at each scrape: 1 while one is held, 0 once a person's run drove it.
    The counter of holds alone fired the alert for an hour, then cleared with the order
    still held."""
    from prometheus_client import generate_latest

    from fsm import metrics

    def scraped() -> float:
        text = generate_latest(metrics.of_store(short)).decode()
        (line,) = [ln for ln in text.splitlines() if ln.startswith("order_saga_orders_held ")]
        return float(line.split()[1])

    oid = await left_by_dead_drivers(short, LIMIT)
    below = await left_by_dead_drivers(short, LIMIT - 1)  # not held: not counted
    assert scraped() == 1
    assert (await driver.run(oid, audit=PERSON)).status == "completed"
    assert short.get(below).interruptions == LIMIT - 1
    assert scraped() == 0


async def test_the_sweep_drives_suspects_one_at_a_time_so_a_bystander_moves_and_is_not_held(
    db_url: str, services: Services, downstream: Downstream
) -> None:
    """Each death of a crash loop interrupts every order its process drove: one beside the
    culprit each time, its slow call in flight, counted as often as the culprit and held
    with it. Orders whose driver died under them twice in a row (fsm.sql.SUSPECT) are now
    claimed one at a time, the rest as usual: never two suspects leased at once by the
    sweep, every one driven, each count back to 0; an ordinary order beside them runs."""
    settings = saga_settings(db_url, lease_seconds=0.5, max_interruptions=5)
    with open_store(settings) as store:
        executor = build_executor(settings, store=store, services=services)
        try:
            suspects = [await left_by_dead_drivers(store, 2) for _ in range(2)]
            plain, _ = await store.create_order(
                user_id=RICH_USER_ID, product_id=WIDGET_ID, quantity=1
            )
            downstream.fault("user.deduct", "delay", count=3, seconds=0.5)
            sweep = asyncio.create_task(
                resume_stuck(store=store, executor=executor, older_than=0, limit=10)
            )
            together = 0
            while not sweep.done():
                leased = [store.get(o).lease_owner == executor.owner for o in suspects]
                together += all(leased)
                await asyncio.wait({sweep}, timeout=0.01)  # a sample each 10 ms until done
            summary = sweep.result()
        finally:
            await executor.aclose()
        assert together == 0
        assert (summary.found, summary.resumed, summary.held) == (3, 3, 0)
        for oid in [*suspects, plain.id]:
            order = store.get(oid)
            assert (order.status, order.interruptions) == ("completed", 0), oid
