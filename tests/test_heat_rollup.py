"""The heatmap read through its roll-up (`fsm.rollup`) equals a straightforward computation
over the whole log, on both databases: nothing rolled, rolled in small chunks, rolled and
then more written, for every window (the last hour, with its first hour split; the last
day; all; and a window older than the hours the roll-up keeps)."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from sqlalchemy import func, select

from bench.heatmap import load_rows
from downstream.seed import ORDINARY_USER_ID, WIDGET_ID
from fsm import queries, rollup
from fsm.executor import Executor
from fsm.machine import AUDIT_SCOPE
from fsm.models import STATE_COLUMN
from fsm.retention import Pruner
from fsm.sql import as_utc
from fsm.store import Store
from fsm.wiring import open_store
from tests.support.database import pg_database_with
from tests.support.processes import Saga, command
from tests.support.settings import saga_env, saga_settings
from tests.support.waiting import wait_until

Key = tuple[str, str]


def nearest_rank(values: list[float], percent: int) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = -(-len(ordered) * percent // 100)  # ceil(percent% of n), from 1
    return ordered[rank - 1]


def straightforward(store: Store, since: datetime | None) -> queries.Heat:
    """Read every row and count in Python: each transition in the window is an edge taken,
    an entry into its to_state, and ends the stay its scope began with the previous
    transition of the same order and scope (its from_state)."""
    with store.engine.connect() as conn:
        lines = conn.execute(select(queries.transitions)).all()
        orders = conn.execute(select(queries.orders)).all()
    logs: dict[tuple[Any, str], list[Any]] = defaultdict(list)
    for line in lines:
        if line.scope != AUDIT_SCOPE:
            logs[(line.order_id, line.scope)].append(line)
    edges: dict[tuple[str, str, str, str], int] = defaultdict(int)
    passed: dict[Key, int] = defaultdict(int)
    stays: dict[Key, list[float]] = defaultdict(list)
    for log in logs.values():
        log.sort(key=lambda line: line.seq)
        for previous, line in zip([None, *log], log, strict=False):
            at = as_utc(line.created_at)
            assert at is not None
            if since is not None and at < since:
                continue
            edges[(line.scope, line.trigger, line.from_state, line.to_state)] += 1
            passed[(line.scope, line.to_state)] += 1
            if previous is not None:
                began = as_utc(previous.created_at)
                assert began is not None
                stays[(line.scope, line.from_state)].append((at - began).total_seconds())
    now: dict[Key, int] = defaultdict(int)
    for order in orders:
        for scope, column in STATE_COLUMN.items():
            now[(scope, getattr(order, column))] += 1
        created = as_utc(order.created_at)
        assert created is not None
        if since is None or created >= since:
            passed[("order", "pending")] += 1
    passed.setdefault(("order", "pending"), 0)

    def bucketed(value: float | None) -> float | None:
        return None if value is None else queries.bucket_seconds(queries.bucket(value))

    states = {
        key: queries.StateHeat(
            passed.get(key, 0),
            now.get(key, 0),
            bucketed(nearest_rank(stays.get(key, []), 50)),
            bucketed(nearest_rank(stays.get(key, []), 95)),
        )
        for key in passed.keys() | now.keys() | stays.keys()
    }
    return queries.Heat(states=states, edges=dict(edges))


def windows() -> dict[str, datetime | None]:
    now = queries.utcnow()
    return {
        "last hour": now - timedelta(hours=1),  # its first hour split: log and roll-up
        "last day": now - timedelta(days=1),
        "all": None,
        "three days": now - timedelta(days=3),  # older than the hours kept: the log
    }


def assert_same(store: Store) -> None:
    for name, since in windows().items():
        expected, got = straightforward(store, since), queries.heat(store, since)
        assert got.edges == expected.edges, name
        assert got.states == expected.states, name


def test_the_rolled_heatmap_equals_the_whole_log(store: Store) -> None:
    url = store.engine.url.render_as_string(hide_password=False)
    assert load_rows(url, 400, seed=1, span=timedelta(days=4)) > 3_000
    heat = queries.heat(store)
    assert heat.states[("order", "completed")].p95 is not None  # cancellations left it
    assert_same(store)  # nothing rolled: the log alone
    # Before the roll: its own cutoff is this or later (the clock may pass an hour while it
    # runs; read after it, the cutoff moved on an hour and the test failed at hh:00).
    oldest = queries.hour_of(queries.utcnow()) - timedelta(hours=queries.KEEP_HOURS)
    assert rollup.roll(store.engine, chunk=250) > 3_000
    assert rollup.roll(store.engine) == 0  # nothing new
    assert_same(store)  # all rolled, hours older than KEEP_HOURS dropped
    with store.engine.connect() as conn:
        hours = conn.execute(select(queries.heat_hours.c.hour)).scalars().all()
    assert hours and min(as_utc(h) or h for h in hours) >= oldest
    load_rows(url, 60, seed=2, span=timedelta(hours=3))  # written after the roll
    assert_same(store)  # the roll-up plus the log past its cursor
    assert rollup.roll(store.engine) > 0
    assert_same(store)


def test_the_heatmap_is_in_utc_whatever_the_servers_time_zone() -> None:
    """A database whose sessions default to another zone (+05:30): the roll-up cut its
    hours at the local half hour, and the last hour's edges read 0 once rolled."""
    with pg_database_with(timezone="Asia/Kolkata") as url, open_store(saga_settings(url)) as store:
        load_rows(url, 60, seed=5, span=timedelta(hours=2))
        since = queries.hour_of(queries.utcnow()) - timedelta(minutes=10)
        before = queries.heat(store, since).edges
        assert before and before == straightforward(store, since).edges
        assert rollup.roll(store.engine) > 0
        assert queries.heat(store, since).edges == before
        assert_same(store)
    kolkata = datetime(2026, 1, 1, 5, 30, tzinfo=timezone(timedelta(hours=5, minutes=30)))
    converted = as_utc(kolkata)
    assert converted is not None and converted.tzinfo is UTC and converted.hour == 0


def test_a_roll_reads_only_past_its_cursor(store: Store) -> None:
    url = store.engine.url.render_as_string(hide_password=False)
    load_rows(url, 30, seed=3, span=timedelta(hours=2))
    first = rollup.roll(store.engine)
    load_rows(url, 10, seed=4, span=timedelta(hours=2))
    second = rollup.roll(store.engine)
    with store.engine.connect() as conn:
        total = conn.execute(
            select(queries.transitions.c.id).where(queries.transitions.c.scope != AUDIT_SCOPE)
        ).all()
    assert first + second == len(total)  # each transition folded once
    assert_same(store)


def test_a_roll_never_passes_a_transition_not_yet_committed(store: Store) -> None:
    """PostgreSQL hands out ids before commit: while a transaction writing the log is
    open, a roll folds nothing (it waits LOCK_WAIT_MS for it, then gives up); once it
    commits, the next roll folds its transition too."""
    if store.engine.dialect.name != "postgresql":
        return  # SQLite: one writer at a time, the roll's transaction waits its turn
    url = store.engine.url.render_as_string(hide_password=False)
    load_rows(url, 5, seed=5, span=timedelta(hours=1))
    assert rollup.roll(store.engine) > 0
    t = queries.transitions
    with store.engine.connect() as conn:
        line = conn.execute(select(t).order_by(t.c.id.desc()).limit(1)).one()._asdict()
    writer = store.engine.connect()
    try:
        late = {**line, "seq": line["seq"] + 100, "created_at": queries.utcnow()}
        late.pop("id")
        writer.execute(t.insert().values(late))  # open: its id is taken, not committed
        with store.engine.begin() as conn:  # a higher id, committed first
            conn.execute(t.insert().values({**late, "seq": late["seq"] + 1}))
        assert rollup.roll(store.engine) == 0  # else its cursor would pass the open one
        writer.commit()
    finally:
        writer.close()
    assert rollup.roll(store.engine) == 2
    assert_same(store)


async def test_transitions_after_a_prune_of_the_newest_orders_are_folded(
    store: Store, executor: Executor
) -> None:
    """Retention deletes the newest orders too; the transitions written after that must
    come after the cursor (SQLite without AUTOINCREMENT gave them the deleted rows' ids,
    behind it: never folded, and the heatmap missed them for good)."""

    async def completed(n: int) -> None:
        for _ in range(n):
            order, _ = await store.create_order(
                user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1, owner=executor.owner
            )
            assert (await executor.drive(order)).status == "completed"

    def finished() -> int:
        return sum(n for k, n in queries.heat(store).edges.items() if k[1] == "all_succeeded")

    await completed(3)
    assert rollup.roll(store.engine) > 0
    assert Pruner(store.engine, older_than=0).run().deleted == 3  # every row of the log
    await completed(3)
    assert rollup.roll(store.engine) > 0
    assert finished() == 6


def test_the_worker_folds_the_log_in_the_background(
    db_url: str, store: Store, services_url: str
) -> None:
    """`order-saga worker` keeps the roll-up current every HEAT_ROLL_INTERVAL seconds (so a
    heatmap load folds only the last seconds), and still stops at once on SIGTERM."""
    url = store.engine.url.render_as_string(hide_password=False)
    t = queries.transitions

    def caught_up() -> bool:
        with store.engine.connect() as conn:
            newest = conn.execute(select(func.max(t.c.id))).scalar_one()
            rolled = conn.execute(select(queries.heat_cursor.c.rolled_id)).scalar_one_or_none()
        return rolled is not None and rolled == newest

    load_rows(url, 20, seed=6, span=timedelta(hours=1))
    env = saga_env(  # services: a worker with none to call refuses to start
        database_url=db_url,
        services_url=services_url,
        heat_roll_interval=0.2,
        worker_metrics_port=0,
    )
    with Saga(command("worker"), env) as worker:
        wait_until(caught_up, what="the worker's fold", alive=worker.running)
        load_rows(url, 5, seed=7, span=timedelta(minutes=10))  # written while it runs
        wait_until(caught_up, what="the worker's next fold", alive=worker.running)
        stopped = worker.stop()
    assert stopped.returncode == 0, stopped.explain()
    assert_same(store)
