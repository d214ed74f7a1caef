"""Issue 21's referee: a fourth step added in the test itself, not in the product.

`tests/support/loyalty_step.py` holds the step (a registry row, its adapter and client) and
an in-process fake service; this test migrates a scratch database (the product's migrations,
then the step's column), and runs real `order-saga` processes that load the step with
ORDER_SAGA_STEP_MODULES: every row of the four-step design table, and a kill -9 right
after each edge of the new step followed by a recovery run, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import text

from downstream.seed import (
    MAX_UNITS_PER_SHIPMENT,
    ORDINARY_USER_ID,
    POOR_USER_ID,
    SOLD_OUT_PRODUCT_ID,
    WIDGET_ID,
)
from fsm.machine import STEP_TRANSITIONS, Edge, is_terminal
from fsm.registry import STEP_NAMES
from fsm.store import Store
from fsm.wiring import build_store
from tests.support import loyalty_step
from tests.support.database import create_pg_database, drop_pg_database, wait_for_lease_expiry
from tests.support.processes import REPO, Saga, run_saga
from tests.support.services import LiveServer
from tests.support.settings import saga_env, saga_settings

LOYALTY = loyalty_step.NAME
ALL_STEPS = (*STEP_NAMES, LOYALTY)
OK, NO = True, False
BASE = {"lease_seconds": 0.5, "max_attempts": 3, "backoff_base": 0.01, "backoff_max": 0.05}
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def loyalty_url() -> Iterator[str]:
    with LiveServer(loyalty_step.app) as server:
        yield server.url


@pytest.fixture
def loyalty(loyalty_url: str) -> Iterator[loyalty_step.Books]:
    loyalty_step.BOOKS.reset()
    yield loyalty_step.BOOKS
    loyalty_step.BOOKS.reset()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def scratch_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A scratch database migrated like a deploy that adds the step: the product's
    migrations (a real `order-saga db upgrade`), then the step's own. One per database
    kind for the module: every test works on orders of its own (the migration is not
    what they test, and a `db upgrade` costs a process start)."""
    name = f"order_saga_fourth_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    url = f"sqlite:///{tmp_path_factory.mktemp('fourth')}/four.db"
    if request.param == "postgresql":
        url = create_pg_database(name)
    try:
        migrated = run_saga("db", "upgrade", env=saga_env(database_url=url))
        assert migrated.returncode == 0, migrated.explain()
        store = build_store(saga_settings(url))
        try:
            with store.engine.begin() as conn:
                conn.execute(text(loyalty_step.COLUMN_DDL))
        finally:
            store.close()
            store.engine.dispose()
        yield url
    finally:
        if request.param == "postgresql":
            drop_pg_database(name)


@pytest.fixture
def store(scratch_url: str) -> Iterator[Store]:
    store = build_store(saga_settings(scratch_url, lease_seconds=30))
    yield store
    store.close()
    store.engine.dispose()


def four_step_env(
    database_url: str, services_url: str, loyalty_url: str, **fields: Any
) -> dict[str, str]:
    env = saga_env(database_url=database_url, services_url=services_url, **fields)
    return env | {
        "ORDER_SAGA_STEP_MODULES": "tests.support.loyalty_step",
        f"ORDER_SAGA_{LOYALTY.upper()}_URL": loyalty_url,
        "PYTHONPATH": str(REPO),
    }


def order_for(outcomes: dict[str, bool]) -> tuple[int, int, int]:
    """(user, product, quantity) for which each step answers as `outcomes` says."""
    user = ORDINARY_USER_ID if outcomes["payment"] else POOR_USER_ID
    product = WIDGET_ID if outcomes["inventory"] else SOLD_OUT_PRODUCT_ID
    quantity = 1 if outcomes["shipping"] else MAX_UNITS_PER_SHIPMENT + 1  # odd either way
    return user, product, quantity + (not outcomes[LOYALTY])  # even: loyalty says no


def loyalty_state(store: Store, order_id: uuid.UUID) -> str:
    with store.engine.connect() as conn:
        column = f"{LOYALTY}_state"
        row = conn.execute(
            text(f"SELECT {column} FROM orders WHERE id = :id"),
            {"id": order_id.hex if store.engine.dialect.name == "sqlite" else order_id},
        ).one()
    return str(row[0])


DRIVE = """
import asyncio, json, sys
from fsm.machine import DESIGN_TABLE
from fsm.registry import STEP_NAMES
from fsm.settings import Settings
from fsm.wiring import open_saga

async def main(plan):
    async with open_saga(Settings()) as saga:
        done = []
        for user, product, quantity in plan:
            order, _ = await saga.store.create_order(
                user_id=user, product_id=product, quantity=quantity, owner=saga.executor.owner
            )
            await saga.executor.drive(order)
            done.append([str(order.id), order.status])
    print(json.dumps({"steps": list(STEP_NAMES), "rows": len(DESIGN_TABLE), "orders": done}))

asyncio.run(main(json.loads(sys.argv[1])))
"""


def test_the_four_step_design_table_through_the_real_executor(
    scratch_url: str, store: Store, services_url: str, loyalty_url: str, loyalty: Any
) -> None:
    combos = [
        dict(zip(ALL_STEPS, outcome, strict=True))
        for outcome in itertools.product((OK, NO), repeat=len(ALL_STEPS))
    ]
    plan = [order_for(outcomes) for outcomes in combos]
    env = four_step_env(scratch_url, services_url, loyalty_url, **BASE)
    ran = Saga([sys.executable, "-c", DRIVE, json.dumps(plan)], env).wait(timeout=300)
    assert ran.returncode == 0, ran.explain()
    answer = json.loads(ran.stdout.strip().splitlines()[-1])
    assert answer["steps"] == list(ALL_STEPS) and answer["rows"] == 2 ** len(ALL_STEPS)

    for outcomes, (order_id, status) in zip(combos, answer["orders"], strict=True):
        log = store.history(uuid.UUID(order_id))
        succeeded = {s for s in ALL_STEPS if outcomes[s]}
        undone = {t.scope for t in log if t.trigger == "finish_compensation"}
        if succeeded == set(ALL_STEPS):  # SPEC §1: all succeeded -> completed, nothing undone
            assert (status, undone) == ("completed", set()), outcomes
        else:  # otherwise failed, and exactly what succeeded undone
            assert (status, undone) == ("failed", succeeded), outcomes
        ended = "succeeded" if outcomes[LOYALTY] else "failed"
        expected = "compensated" if LOYALTY in undone else ended
        assert loyalty_state(store, uuid.UUID(order_id)) == expected
    assert all(count == 1 for count in loyalty.effects.values())  # each key applied once
    assert set(loyalty.points) == {oid for oid, s in answer["orders"] if s == "completed"}


@dataclass(frozen=True)
class Scenario:
    outcomes: dict[str, bool]  # what each step answers
    final: str
    down: bool = False  # loyalty answers 503 until its step expires
    settings: dict[str, Any] = field(default_factory=dict)


HAPPY = Scenario(dict.fromkeys(ALL_STEPS, OK), "completed")
LOYALTY_SAYS_NO = Scenario({**dict.fromkeys(ALL_STEPS, OK), LOYALTY: NO}, "failed")
PAYMENT_SAYS_NO = Scenario({**dict.fromkeys(ALL_STEPS, OK), "payment": NO}, "failed")
EXPIRES = Scenario(
    dict.fromkeys(ALL_STEPS, OK),
    "failed",
    down=True,
    settings={"step_deadline": 1, "max_attempts": 100},
)
# (trigger, source) of each step edge -> the scenario whose run takes it.
SCENARIO_FOR = {
    ("request", "pending"): HAPPY,
    ("succeed", "requested"): HAPPY,
    ("fail", "requested"): LOYALTY_SAYS_NO,
    ("expire", "requested"): EXPIRES,
    ("compensate", "succeeded"): PAYMENT_SAYS_NO,
    ("compensate", "expired"): EXPIRES,
    ("finish_compensation", "compensating"): PAYMENT_SAYS_NO,
}
LOYALTY_EDGES = [
    Edge(LOYALTY, trigger, source, dest)
    for trigger, sources, dest in STEP_TRANSITIONS
    for source in (sources if isinstance(sources, list) else [sources])
]


def test_every_edge_of_the_new_step_has_a_crash_scenario() -> None:
    assert {(e.trigger, e.source) for e in LOYALTY_EDGES} == SCENARIO_FOR.keys()


@pytest.mark.parametrize("edge", LOYALTY_EDGES, ids=lambda e: f"{e.trigger}-from-{e.source}")
async def test_kill_9_right_after_each_edge_of_the_new_step(
    edge: Edge,
    scratch_url: str,
    store: Store,
    services_url: str,
    loyalty_url: str,
    loyalty: loyalty_step.Books,
) -> None:
    scenario = SCENARIO_FOR[(edge.trigger, edge.source)]
    user, product, quantity = order_for(scenario.outcomes)
    order, _ = await store.create_order(user_id=user, product_id=product, quantity=quantity)
    env = four_step_env(scratch_url, services_url, loyalty_url, **(BASE | scenario.settings))
    loyalty.down = scenario.down

    crash_env = env | {"ORDER_SAGA_CRASH_AFTER": f"{LOYALTY}:{edge.trigger}"}
    crashed = run_saga("resume", "--order", str(order.id), env=crash_env)
    assert crashed.returncode == -9, crashed.explain()
    at_crash = store.history(order.id)
    last = [t for t in at_crash if t.scope == LOYALTY][-1]
    assert (last.trigger, last.from_state, last.to_state) == (edge.trigger, edge.source, edge.dest)
    assert loyalty_state(store, order.id) == edge.dest

    loyalty.down = False
    wait_for_lease_expiry(store, order.id)
    recovered = run_saga("resume", "--order", str(order.id), env=env)
    assert recovered.returncode == 0, recovered.explain()

    final = store.get(order.id)
    assert final.status == scenario.final and is_terminal(final.state)
    log = store.history(order.id)
    assert [(t.seq, t.trigger) for t in log[: len(at_crash)]] == [
        (t.seq, t.trigger) for t in at_crash
    ]
    triggers = [(t.scope, t.trigger) for t in log]
    for step in ALL_STEPS:
        assert triggers.count((step, "request")) <= 1 and triggers.count((step, "compensate")) <= 1
    # The points: held once for a completed order, none left for a failed one.
    assert all(count == 1 for count in loyalty.effects.values())
    assert (str(order.id) in loyalty.points) == (scenario.final == "completed")
    assert loyalty_state(store, order.id) in (
        ("succeeded",) if scenario.final == "completed" else ("failed", "compensated")
    )
