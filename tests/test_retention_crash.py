"""SPEC §3 for retention: `order-saga prune` SIGKILLs itself at each point of a batch
(archive fsynced, transitions deleted but not committed, a batch committed); afterwards no
transition is an orphan, every order is either whole or gone, every gone order is in the
archive, and a later prune finishes the job. On SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest

from fsm import archive
from fsm.errors import OrderNotFound
from fsm.executor import Executor
from fsm.store import Store, utcnow
from tests.support.processes import run_saga
from tests.support.retention import orphan_transitions, populate, transition_count
from tests.support.services import Downstream
from tests.support.settings import saga_env

POINTS = ["archived", "transitions", "batch"]


@pytest.mark.slow
@pytest.mark.parametrize("point", POINTS)
async def test_a_prune_killed_midway_leaves_no_orphans_and_a_later_one_finishes(
    point: str,
    db_url: str,
    store: Store,
    executor: Executor,
    downstream: Downstream,
    tmp_path: Path,
) -> None:
    population = await populate(store, executor, downstream, completed=4)
    logs = {i: store.history(i) for i in population.eligible}
    lease_ends = store.get(population.kept["leased"]).lease_expires_at
    assert lease_ends is not None
    file = tmp_path / "pruned.jsonl.gz"
    env = saga_env(database_url=db_url, services_url=downstream.url)
    args = ("--older-than", "0", "--batch", "2", "--archive", str(file))

    crashed = run_saga("prune", *args, env={**env, "ORDER_SAGA_CRASH_AFTER": f"prune:{point}"})

    assert crashed.returncode == -9, crashed.explain()
    assert orphan_transitions(store) == 0
    gone = set()
    for order_id, log in logs.items():  # whole or gone, never half
        try:
            store.get(order_id)
        except OrderNotFound:
            gone.add(order_id)
            assert transition_count(store, order_id) == 0
        else:
            assert store.history(order_id) == log
    assert len(gone) == (2 if point == "batch" else 0)
    archived = {line["order"]["id"] for line in archive.read(file)}
    assert {str(i) for i in gone} <= archived

    finished = run_saga("prune", *args, env=env)

    assert finished.returncode == 0, finished.explain()
    assert orphan_transitions(store) == 0
    for order_id in logs:
        with pytest.raises(OrderNotFound):
            store.get(order_id)
    # The running and parked ones stay; the leased one too while its lease (30 s) holds:
    # a lease that ran out frees the order, and a slow machine can outlast it.
    assert all(store.get(i) for why, i in population.kept.items() if why != "leased")
    if utcnow() < lease_ends:
        assert store.get(population.kept["leased"])
    # Every deleted order is in the archive with its whole log (the last line counts).
    for order_id, log in logs.items():
        found = archive.find(file, order_id)
        assert found is not None
        assert [(t.seq, t.trigger) for t in found[1]] == [(t.seq, t.trigger) for t in log]
