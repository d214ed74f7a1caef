"""kill -9 of `order-saga relay`, and of `order-saga serve` with the relay inside it, in the
middle of deliveries, repeated (issue 19): every event still reaches every destination (the
sink; with `serve`, RabbitMQ too), in order per order once deduplicated; the duplicates the
kills cost are counted and bounded (at most one claimed batch per kill and destination).
Both databases."""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Any

import pytest
from alembic import command as alembic_command

from fsm import outbox, subscriptions
from fsm.executor import Executor
from fsm.migrate import alembic_config
from fsm.relay import register_amqp
from fsm.store import Store
from tests.support.amqp import BROKER, consuming
from tests.support.events import expected, orders, out_of_order, sink_seen, subscribe_sink
from tests.support.processes import ORDER_SAGA, Saga, command
from tests.support.services import Downstream, answers, free_port
from tests.support.settings import saga_env, saga_settings
from tests.support.waiting import wait_until, wait_until_async

KILLS = 4
BATCH = 3
SERVE_KILLS = 3  # each costs a `serve` start (a few seconds on a loaded machine)


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
        event_timeout=0.5,
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


def first_arrivals(events: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The events without their repeats (first arrival kept), and how many repeats."""
    seen: set[str] = set()
    kept = []
    for event in events:
        if event["id"] not in seen:
            seen.add(event["id"])
            kept.append(event)
    return kept, len(events) - len(kept)


@pytest.mark.slow
async def test_serve_killed_mid_delivery_every_destination_gets_every_event_in_order(
    db_url: str, store: Store, executor: Executor, services_url: str, downstream: Downstream
) -> None:
    """`serve` (the relay in its lifespan) delivering to the sink and to RabbitMQ, killed
    with SIGKILL as soon as it has delivered something, SERVE_KILLS times; then one more `serve`
    finishes. The kills land with sink requests in flight (each takes 50 ms)."""
    # The fixture made the schema from the models; serve migrates: mark it as current.
    alembic_command.stamp(alembic_config(db_url), "head")
    subscribe_sink(store, services_url)
    # The broker subscribed before the orders exist, so their events go to it too.
    await register_amqp(store, saga_settings(db_url, amqp_url=BROKER))
    assert {d.kind for d in subscriptions.destinations(store)} == {"webhook", "amqp"}
    ids = await orders(store, executor, 12)  # their events wait: nothing relays yet
    want = expected(store, ids, outbox.DEFAULT_TYPES)
    subjects = {str(i) for i in ids}
    downstream.fault("sink.receive", "delay", count=1000, seconds=0.05)
    env = saga_env(
        database_url=db_url,
        services_url=services_url,
        amqp_url=BROKER,
        relay_interval=0.02,
        relay_batch=BATCH,
        relay_lease=1,
        event_timeout=0.5,
        event_backoff_base=0.05,
        event_backoff_max=0.2,
        shutdown_grace=0,
    )

    def serve() -> tuple[Saga, str]:
        port = free_port()
        return Saga(command("serve", "--port", str(port), "--no-sweep"), env), (
            f"http://127.0.0.1:{port}"
        )

    async with consuming() as consumer:

        def received() -> int:
            return len(sink_seen(services_url)["events"]) + len(consumer.of(subjects))

        for _ in range(SERVE_KILLS):
            before = received()
            server, _url = serve()
            with server:
                wait_until(
                    lambda s=server: relay_children(s.process.pid),  # type: ignore[misc]
                    what="serve's relay process",
                    alive=server.running,
                )
                await wait_until_async(
                    lambda b=before, s=server: (
                        received() > b  # type: ignore[misc]
                        or received() >= 2 * len(want)
                        or not s.running()
                    ),
                    what="serve to deliver",
                )
                assert server.running(), server.stop().explain()
                relays = relay_children(server.process.pid)
                assert relays, "serve runs its relay as a child process"
                os.kill(server.process.pid, signal.SIGKILL)
                server.process.wait()
                # The child dies with serve: it sends nothing more (the next serve's does).
                wait_until(lambda r=relays: not any(map(alive, r)), what="the relay to die")
        downstream.clear_faults()
        server, url = serve()
        with server:
            wait_until(lambda: answers(f"{url}/healthz"), what="serve", alive=server.running)
            await wait_until_async(
                lambda: (
                    len(sink_seen(services_url)["events"]) >= len(want)
                    and len({m.message_id for m in consumer.of(subjects)}) >= len(want)
                ),
                what="every event at both destinations",
            )
            relays = relay_children(server.process.pid)
            assert relays
            server.stop()
            assert not any(map(alive, relays)), "serve's shutdown stops its relay"
        messages = consumer.events(subjects)

    seen = sink_seen(services_url)
    assert sorted(e["id"] for e in seen["events"]) == sorted(want)  # every one, at least once
    assert out_of_order(seen["events"]) == []  # in order per order, after dedup
    assert seen["rejected"] == 0
    published, amqp_duplicates = first_arrivals(messages)
    assert sorted(e["id"] for e in published) == sorted(want)
    assert out_of_order(published) == []
    print(
        f"serve killed {SERVE_KILLS} times: {len(want)} events per destination, duplicates: "
        f"sink {seen['duplicates']}, RabbitMQ {amqp_duplicates}"
    )
    assert seen["duplicates"] <= SERVE_KILLS * BATCH
    assert amqp_duplicates <= SERVE_KILLS * BATCH


def relay_children(pid: int) -> list[int]:
    """The `order-saga relay --child` processes `pid` started (fsm.relay_child)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                relay = b"relay\0--child" in f.read()
        except (OSError, ValueError, IndexError):
            continue  # not a process, or gone
        if parent == pid and relay:
            found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped has stopped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
