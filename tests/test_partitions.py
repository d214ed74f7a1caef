"""The partitioned transition log on PostgreSQL (issue 22, fsm.partitions): one order's
log lives in its creation day's partition; a prune drops a past day whole (archived first)
when every order in it is prunable and leaves a day holding one that must stay to the
row-by-row batches; a kill -9 at any point of a drop leaves every order whole or gone;
the migration converts an existing log."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import text

from fsm import archive, partitions
from fsm.errors import OrderNotFound
from fsm.executor import Executor
from fsm.migrate import alembic_config, upgrade
from fsm.retention import Pruner
from fsm.store import Store, make_engine, utcnow
from tests.support.database import create_pg_database, drop_pg_database
from tests.support.processes import run_saga
from tests.support.retention import (
    age_into,
    orphan_transitions,
    partition_names,
    populate,
    rows_in,
    transition_count,
)
from tests.support.services import Downstream
from tests.support.settings import saga_env

# PostgreSQL only: SQLite keeps one plain table (batched deletes, tests/test_retention.py).
postgres_only = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)


def three_days_ago() -> object:
    return (utcnow() - timedelta(days=3)).date()


@postgres_only
async def test_a_day_whose_orders_all_go_is_dropped_whole_after_its_archive(
    store: Store, executor: Executor, downstream: Downstream, tmp_path: Path
) -> None:
    population = await populate(store, executor, downstream, completed=3)
    logs = {i: store.history(i) for i in population.eligible}
    kept = {i: (store.get(i), store.history(i)) for i in population.kept.values()}
    day = three_days_ago()
    name = age_into(store, population.eligible, day)  # type: ignore[arg-type]
    assert rows_in(store, name) == sum(len(log) for log in logs.values())
    file = tmp_path / "pruned.jsonl.gz"

    summary = Pruner(store.engine, older_than=0, appender=lambda: archive.Appender(file)).run()

    assert name not in partition_names(store)  # dropped, not emptied row by row
    assert summary.partitions >= 1
    assert summary.deleted == len(population.eligible)
    assert summary.batches == 0  # nothing left for the batches: the rest must stay
    assert orphan_transitions(store) == 0
    for order_id, log in logs.items():
        with pytest.raises(OrderNotFound):
            store.get(order_id)
        found = archive.find(file, order_id)
        assert found is not None
        assert [(t.seq, t.trigger) for t in found[1]] == [(t.seq, t.trigger) for t in log]
    for order_id, (order, log) in kept.items():  # today's partition: untouched
        assert store.get(order_id).version == order.version
        assert store.history(order_id) == log


@postgres_only
async def test_a_day_holding_an_order_that_must_stay_is_pruned_row_by_row(
    store: Store, executor: Executor, downstream: Downstream
) -> None:
    population = await populate(store, executor, downstream, completed=2)
    parked = population.kept["parked"]
    name = age_into(store, [*population.eligible, parked], three_days_ago())  # type: ignore[arg-type]
    parked_log = store.history(parked)

    summary = Pruner(store.engine, older_than=0, batch=2).run()

    assert name in partition_names(store)
    assert summary.deleted == len(population.eligible)
    assert summary.batches == 2
    assert all(transition_count(store, i) == 0 for i in population.eligible)
    assert store.history(parked) == parked_log
    assert rows_in(store, name) == len(parked_log)
    assert orphan_transitions(store) == 0


@pytest.mark.slow
@postgres_only
@pytest.mark.parametrize("point", ["partition-archived", "partition-dropped"])
async def test_a_drop_killed_midway_leaves_every_order_whole_and_a_later_prune_finishes(
    point: str,
    db_url: str,
    store: Store,
    executor: Executor,
    downstream: Downstream,
    tmp_path: Path,
) -> None:
    population = await populate(store, executor, downstream, completed=2)
    name = age_into(store, population.eligible, three_days_ago())  # type: ignore[arg-type]
    logs = {i: store.history(i) for i in population.eligible}
    file = tmp_path / "pruned.jsonl.gz"
    env = saga_env(database_url=db_url, services_url=downstream.url)
    args = ("--older-than", "0", "--archive", str(file))

    crashed = run_saga("prune", *args, env={**env, "ORDER_SAGA_CRASH_AFTER": f"prune:{point}"})

    assert crashed.returncode == -9, crashed.explain()
    assert name in partition_names(store)  # the drop and the deletes undone together
    for order_id, log in logs.items():
        assert store.history(order_id) == log
    assert orphan_transitions(store) == 0

    finished = run_saga("prune", *args, env=env)

    assert finished.returncode == 0, finished.explain()
    assert name not in partition_names(store)
    for order_id, log in logs.items():
        with pytest.raises(OrderNotFound):
            store.get(order_id)
        found = archive.find(file, order_id)  # the last line of it counts
        assert found is not None
        assert [t.seq for t in found[1]] == [t.seq for t in log]
    assert orphan_transitions(store) == 0


@pytest.fixture
def pg_empty(worker_id: str) -> Iterator[str]:
    name = f"order_saga_parts_{worker_id}_{os.getpid()}"
    yield create_pg_database(name)
    drop_pg_database(name)


def test_the_migration_converts_an_existing_log(pg_empty: str) -> None:
    upgrade(pg_empty, "0006")
    engine = make_engine(pg_empty)
    old = utcnow() - timedelta(days=40)
    with engine.begin() as conn:
        for n, created in enumerate((old, utcnow())):
            conn.execute(
                text(
                    "INSERT INTO orders (id, user_id, product_id, quantity, state, status, "
                    "payment_state, inventory_state, shipping_state, version, attempts, "
                    "cancel_requested, created_at, updated_at, machine_version, created_by) "
                    "VALUES (:id, 1, 1, 1, 'completed', 'completed', 'succeeded', "
                    "'succeeded', 'succeeded', 2, '{}', false, :at, :at, '', '')"
                ),
                {"id": f"00000000-0000-0000-0000-00000000000{n}", "at": created},
            )
            for seq in (1, 2):
                conn.execute(
                    text(
                        "INSERT INTO transitions (order_id, seq, scope, trigger, from_state, "
                        "to_state, created_at, machine_version) VALUES (:id, :seq, 'order', "
                        "'go', 'a', 'b', :at, '')"
                    ),
                    {"id": f"00000000-0000-0000-0000-00000000000{n}", "seq": seq, "at": created},
                )

    upgrade(pg_empty)

    with engine.connect() as conn:
        assert partitions.is_partitioned(conn)
        names = {p.name for p in partitions.existing(conn)}
        rows = conn.execute(
            text("SELECT tableoid::regclass::text, order_id, seq FROM transitions ORDER BY 2, 3")
        ).all()
    assert partitions.name_of(old.date()) in names  # from the oldest order's day
    assert partitions.name_of((utcnow() + timedelta(days=partitions.AHEAD)).date()) in names
    assert [(r[0], r[2]) for r in rows] == [
        (partitions.name_of(old.date()), 1),
        (partitions.name_of(old.date()), 2),
        (partitions.name_of(utcnow().date()), 1),
        (partitions.name_of(utcnow().date()), 2),
    ]
    command.downgrade(alembic_config(pg_empty), "0006")  # and back
    with engine.connect() as conn:
        assert not partitions.is_partitioned(conn)
        assert conn.execute(text("SELECT count(*) FROM transitions")).scalar_one() == 4
    engine.dispose()
