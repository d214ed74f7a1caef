"""SPEC §3 for the operator's edge: `order-saga orders resolve` SIGKILLs itself right after
committing needs_attention -resolve-> resolved (lease still held), and a fresh `resume`
finds the order terminal, keeps the log as it was, and releases it. On SQLite and
PostgreSQL. `tests/test_crash.py` counts the edges it covers (tests/support/crash_points.py)
as covered.
"""

from __future__ import annotations

import pytest

from downstream.seed import ORDINARY_USER_ID, SOLD_OUT_PRODUCT_ID
from fsm.store import Store
from tests.support.crash_points import CRASH_TESTED_ELSEWHERE
from tests.support.database import wait_for_lease_expiry
from tests.support.processes import drive_here, run_saga
from tests.support.services import Downstream, Fault, set_faults
from tests.support.settings import saga_env

SETTINGS = {"lease_seconds": 0.5, "max_attempts": 2, "backoff_base": 0.01, "backoff_max": 0.05}
REFUND_DOWN = Fault("user.refund", "error")  # count 1000 > the retry budget: parks
REASON = "refunded by hand, ticket OPS-42"


@pytest.mark.slow
async def test_crash_right_after_resolve(db_url: str, store: Store, downstream: Downstream) -> None:
    # Row 4 (inventory sold out) with the refund down: the compensation parks.
    order, _ = await store.create_order(
        user_id=ORDINARY_USER_ID, product_id=SOLD_OUT_PRODUCT_ID, quantity=1
    )
    set_faults(downstream.url, [REFUND_DOWN])
    state = await drive_here(
        "resume", order.id, database_url=db_url, services_url=downstream.url, settings=SETTINGS
    )
    assert state == "needs_attention"
    set_faults(downstream.url, ())
    env = saga_env(database_url=db_url, services_url=downstream.url, **SETTINGS)

    crashed = run_saga(
        "orders",
        "resolve",
        str(order.id),
        "--reason",
        REASON,
        env={**env, "ORDER_SAGA_CRASH_AFTER": "order:resolve"},
    )
    assert crashed.returncode == -9, crashed.explain()
    at_crash = store.history(order.id)
    last = at_crash[-1]
    assert (last.trigger, last.from_state, last.to_state) == (
        "resolve",
        "needs_attention",
        "resolved",
    )
    assert last.detail is not None and last.detail["reason"] == REASON
    # The terminal write released the lease itself: nothing is left for the dead process.
    assert store.get(order.id).lease_owner is None

    wait_for_lease_expiry(store, order.id)
    recovered = run_saga("resume", "--order", str(order.id), env=env)
    assert recovered.returncode == 0, recovered.explain()
    final = store.get(order.id)
    assert (final.state, final.status, final.lease_owner) == ("resolved", "resolved", None)
    after = store.history(order.id)
    assert [(t.seq, t.trigger) for t in after] == [(t.seq, t.trigger) for t in at_crash]
    effects = downstream.effects()
    assert all(n <= 1 for n in effects.values()), effects


def test_listed_edges_are_declared() -> None:
    from fsm.machine import edges

    declared = {(str(e.scope), str(e.trigger), str(e.source)) for e in edges()}
    assert CRASH_TESTED_ELSEWHERE <= declared
