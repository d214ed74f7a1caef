"""kill -9 of `order-saga relay` in the middle of deliveries, repeated (issue 19): every
event still reaches the sink, in order per order once deduplicated; the duplicates the
kills cost are counted and bounded (at most one claimed batch per kill). Both databases."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from fsm import outbox
from fsm.executor import Executor
from fsm.store import Store
from tests.support.events import expected, orders, out_of_order, sink_seen, subscribe_sink
from tests.support.processes import ORDER_SAGA
from tests.support.services import Downstream
from tests.support.settings import saga_env
from tests.support.waiting import wait_until

KILLS = 4
BATCH = 3


@pytest.mark.slow
async def test_relays_killed_mid_delivery_lose_nothing_and_keep_order(
    db_url: str, store: Store, executor: Executor, services_url: str, downstream: Downstream
) -> None:
    subscribe_sink(store, services_url)
    ids = await orders(store, executor, 12)  # their events wait: no relay runs yet
    want = expected(store, ids, outbox.DEFAULT_TYPES)
    # Each delivery takes a while, so a kill lands with requests in flight.
    downstream.fault("sink.receive", "delay", count=1000, seconds=0.05)
    env = saga_env(
        database_url=db_url,
        services_url=services_url,
        relay_interval=0.02,
        relay_batch=BATCH,
        relay_lease=1,
        event_backoff_base=0.05,
        event_backoff_max=0.2,
    )

    def received() -> int:
        return len(sink_seen(services_url)["events"])

    for _ in range(KILLS):
        before = received()
        relay = subprocess.Popen([ORDER_SAGA, "relay"], env=env, stderr=subprocess.DEVNULL)
        try:
            wait_until(
                lambda b=before: received() > b or received() >= len(want),  # type: ignore[misc]
                what="the relay to deliver",
                alive=lambda r=relay: r.poll() is None,  # type: ignore[misc]
            )
        finally:
            os.kill(relay.pid, signal.SIGKILL)
            relay.wait()
    downstream.clear_faults()
    relay = subprocess.Popen([ORDER_SAGA, "relay"], env=env, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: received() >= len(want), what="every event at the sink")
    finally:
        relay.send_signal(signal.SIGTERM)
        relay.wait(timeout=30)
    seen = sink_seen(services_url)
    assert sorted(e["id"] for e in seen["events"]) == sorted(want)  # every one, at least once
    assert out_of_order(seen["events"]) == []  # in order per order, after dedup
    assert seen["rejected"] == 0
    print(f"{len(want)} events, {KILLS} kills, {seen['duplicates']} duplicates")
    assert seen["duplicates"] <= KILLS * BATCH
