"""The relay (issue 19 items 2-4) over real HTTP: every event reaches every webhook, signed,
in order per order; failing endpoints are retried, dead-lettered past the age limit and
redelivered by the command; a dead endpoint delays neither the orders nor the other
destinations. Both databases."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
import uuid
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import standardwebhooks
from alembic import command as alembic_command
from click.testing import CliRunner, Result
from sqlalchemy import text
from sqlmodel import SQLModel
from typer.main import get_command

from downstream.seed import ORDINARY_USER_ID, RICH_USER_ID, WIDGET_ID
from fsm import outbox, outbox_sql, subscriptions
from fsm.destinations import DELIVERED, refused, transient
from fsm.destinations.webhook import WebhookSender, new_secret, signed_headers, signing_keys
from fsm.executor import Executor
from fsm.migrate import alembic_config
from fsm.relay import AMQP_DESTINATION, FailureWatch, Relay, register_amqp
from fsm.store import Store, utcnow
from fsm.wiring import open_store
from order_saga.cli import app
from tests.support.api import api
from tests.support.endpoint import Endpoint, Mode
from tests.support.events import (
    FAST_EVENTS,
    below_horizon,
    events_of,
    expected,
    label,
    orders,
    out_of_order,
    relaying,
    sink_seen,
    subscribe_sink,
)
from tests.support.processes import Saga, children, command
from tests.support.services import Downstream, answers, free_port
from tests.support.settings import saga_env, saga_settings
from tests.support.waiting import wait_until, wait_until_async


async def test_every_event_reaches_the_sink_once_in_order_verified(
    db_url: str, store: Store, executor: Executor, services_url: str
) -> None:
    subscribe_sink(store, services_url)
    async with relaying(store, saga_settings(db_url, **FAST_EVENTS)):
        ids = await orders(store, executor, 12)
        want = expected(store, ids, outbox.DEFAULT_TYPES)
        await wait_until_async(
            lambda: len(sink_seen(services_url)["events"]) >= len(want), what="the sink"
        )
        await wait_until_async(
            lambda: subscriptions.lags(store)[label(store, f"{services_url}/sink")][0] == 0
        )
    seen = sink_seen(services_url)
    assert sorted(e["id"] for e in seen["events"]) == sorted(want)
    assert out_of_order(seen["events"]) == []
    assert seen["rejected"] == 0  # every signature verified by the sink
    assert seen["duplicates"] == 0  # nobody died: exactly once here
    (backlog,) = subscriptions.backlog(store)
    assert (backlog.pending, backlog.dead) == (0, 0)


async def test_standard_webhooks_verifies_what_the_relay_sends(
    db_url: str, store: Store, executor: Executor
) -> None:
    async with Endpoint() as endpoint:
        added = subscriptions.add_webhook(store, endpoint.url, outbox.DEFAULT_TYPES)
        async with relaying(store, saga_settings(db_url, **FAST_EVENTS)):
            (order_id,) = await orders(store, executor, 1)
            await wait_until_async(lambda: len(endpoint.requests) >= 2, what="two events")
    verifier = standardwebhooks.Webhook(added.secret)
    for request in endpoint.requests:
        assert request.headers["content-type"] == outbox.CONTENT_TYPE
        assert request.headers["webhook-id"] == request.event["id"]
        assert verifier.verify(request.body, request.headers) == request.event
    assert [r.event["id"] for r in endpoint.requests] == [
        e["id"] for e in events_of(store, order_id) if e["type"] in outbox.DEFAULT_TYPES
    ]


@pytest.mark.parametrize("tamper", ["body", "timestamp", "signature"])
def test_a_tampered_request_is_rejected_by_standard_webhooks(tamper: str) -> None:
    from fsm.destinations.webhook import new_secret

    secret, body = new_secret(), b'{"id":"x:1","type":"order.completed"}'
    headers = signed_headers(secret, "x:1", body)
    verifier = standardwebhooks.Webhook(secret)
    assert verifier.verify(body, headers)
    if tamper == "body":
        body = body.replace(b"completed", b"cancelled")
    elif tamper == "timestamp":
        headers["webhook-timestamp"] = str(int(headers["webhook-timestamp"]) + 1)
    else:
        headers["webhook-signature"] = signed_headers(new_secret(), "x:1", body)[
            "webhook-signature"
        ]
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        verifier.verify(body, headers)


def run_cli(db_url: str, services_url: str, *args: str) -> Result:
    """The `order-saga` command, in this process (a console script start costs seconds on
    a loaded machine; the process tests start the real one)."""
    env = saga_env(database_url=db_url, services_url=services_url)
    return CliRunner().invoke(get_command(app), list(args), env=env)


@pytest.mark.parametrize("mode", ["500", "hang", "close"])
async def test_a_failing_endpoint_is_retried_dead_lettered_and_redelivered(
    mode: Mode, db_url: str, store: Store, executor: Executor, services_url: str
) -> None:
    settings = saga_settings(db_url, **{**FAST_EVENTS, "event_max_age": 1.5, "event_timeout": 0.2})
    async with Endpoint(mode=mode) as endpoint:
        subscriptions.add_webhook(store, endpoint.url, outbox.DEFAULT_TYPES)
        async with relaying(store, settings):
            ids = await orders(store, executor, 3)
            want = expected(store, ids, outbox.DEFAULT_TYPES)

            def all_dead() -> bool:
                return len(subscriptions.deliveries(store, failed=True)) == len(want)

            await wait_until_async(all_dead, what="every delivery dead-lettered")
            dead = subscriptions.deliveries(store, failed=True)
            first = [d for d in dead if d.last_error != "behind a dead letter"]
            assert first and any(d.attempts > 1 for d in first)  # retried before giving up
            assert endpoint.attempts > len(first)
            assert endpoint.requests == []
            listed = await asyncio.to_thread(
                run_cli, db_url, services_url, "events", "list", "--failed", "--json"
            )
            assert listed.exit_code == 0, listed.output
            assert sorted(d["event_id"] for d in _json(listed.stdout)["deliveries"]) == sorted(want)

            endpoint.mode = "ok"
            done = await asyncio.to_thread(
                run_cli, db_url, services_url, "events", "redeliver", "--all"
            )
            assert done.exit_code == 0, done.output
            assert f"{len(want)} deliveries back in line" in done.stdout
            await wait_until_async(
                lambda: len(endpoint.requests) >= len(want), what="the redelivery"
            )
    assert sorted(e["id"] for e in endpoint.events()) == sorted(want)
    assert out_of_order(endpoint.events()) == []
    assert subscriptions.deliveries(store, failed=True) == []


async def test_a_failing_endpoint_is_logged_when_it_starts_failing_and_when_it_recovers(
    db_url: str, store: Store, executor: Executor, caplog: pytest.LogCaptureFixture
) -> None:
    """README: a delivery's error is "logged, stored, listed". Logged per destination, not
    per event: one warning with the error when its deliveries start failing (however many
    are retried meanwhile), one info line when they are delivered again; the webhook named
    by its label, never by its URL (whose path or query may hold a token)."""
    caplog.set_level(logging.INFO, logger="order_saga.relay")
    settings = saga_settings(db_url, **FAST_EVENTS)
    async with Endpoint(mode="500") as endpoint:
        subscriptions.add_webhook(store, endpoint.url, outbox.DEFAULT_TYPES)
        where = label(store, endpoint.url)

        def said(level: int) -> list[str]:  # its pump's lines (not the start and stop)
            lines = [r.getMessage() for r in caplog.records if r.levelno == level]
            return [line for line in lines if line.startswith(f"relay {where}: ")]

        async with relaying(store, settings):
            ids = await orders(store, executor, 3)
            want = expected(store, ids, outbox.DEFAULT_TYPES)
            await wait_until_async(
                lambda: endpoint.attempts >= 3 * len(want), what="every event retried"
            )
            (failing,) = said(logging.WARNING)  # one line, not one per event or attempt
            assert failing.startswith(f"relay {where}: deliveries failing: ")
            assert "last error: HTTP 500" in failing
            endpoint.mode = "ok"
            await wait_until_async(lambda: said(logging.INFO), what="the recovery line")
            (recovered,) = said(logging.INFO)
            assert recovered.startswith(f"relay {where}: deliveries succeed again after ")
            await wait_until_async(
                lambda: len(endpoint.requests) >= len(want), what="every event delivered"
            )
    assert len(said(logging.WARNING)) == 1
    assert endpoint.url not in caplog.text  # its label only


def test_a_destination_that_keeps_failing_is_warned_about_at_most_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="order_saga.relay")
    now = [0.0]
    watch = FailureWatch("amqp", lambda: now[0])
    refused = transient("broker: AMQPConnectionError: amqp://guest:hunter2@broker/ refused")
    for at in (0.0, 10.0, 59.9, 60.0, 61.0, 130.0):
        now[0] = at
        watch.see([refused, DELIVERED, refused])
        watch.see([])  # nothing sent: no news
    now[0] = 140.0
    watch.see([DELIVERED])
    watch.see([DELIVERED])  # still fine: said once
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    tail = ", last error: broker: AMQPConnectionError: amqp://***@broker/ refused"  # storable
    assert [(level, line.split(" (retried")[0]) for level, line in lines] == [
        ("WARNING", f"relay amqp: deliveries failing: 2 of 3 attempts failed{tail}"),
        (
            "WARNING",
            "relay amqp: deliveries still failing after 60 s: "
            f"6 attempts failed since the last warning{tail}",
        ),
        (
            "WARNING",
            "relay amqp: deliveries still failing after 130 s: "
            f"4 attempts failed since the last warning{tail}",
        ),
        ("INFO", "relay amqp: deliveries succeed again after 140 s (12 failed attempts)"),
    ]
    assert "hunter2" not in caplog.text


def test_a_refused_delivery_is_said_to_be_dead_lettered_not_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 4xx answer (but 408, 425, 429) is dead-lettered at once: the failure warning says
    so, not "retried with backoff" (the event was dead-lettered 30 ms after the line)."""
    caplog.set_level(logging.WARNING, logger="order_saga.relay")
    now = [0.0]
    watch = FailureWatch("webhook:6 http://127.0.0.1:47110", lambda: now[0])
    watch.see([refused("HTTP 401")])
    now[0] = 61.0
    watch.see([transient("HTTP 500"), refused("HTTP 401")])
    now[0] = 122.0
    watch.see([transient("HTTP 500")])
    now[0] = 130.0
    watch.see([refused("HTTP 401")])  # within the minute: no line
    watch.see([DELIVERED])  # a new start: that refusal is not counted into the next line
    watch.see([transient("HTTP 500")])
    first, mixed, retried, again = (r.getMessage() for r in caplog.records)
    assert first == (
        "relay webhook:6 http://127.0.0.1:47110: deliveries failing: 1 of 1 attempts failed, "
        "last error: HTTP 401 (refused: dead-lettered, not retried; `order-saga events list "
        "--failed` lists them, `order-saga events redeliver` sends them again)"
    )
    assert mixed.endswith(
        "last error: HTTP 401 (1 refused and dead-lettered, the others retried with backoff; "
        "`order-saga events list --failed` lists the dead letters)"
    )
    assert retried.endswith(
        "last error: HTTP 500 (retried with backoff; `order-saga events list` lists each delivery)"
    )
    assert again.endswith(
        "last error: HTTP 500 (retried with backoff; `order-saga events list` lists each delivery)"
    )


# A failed event's backoff far longer than the waits below (at least 60 s): delivered
# within them only if the relay brings it forward.
LONG_BACKOFF = {**FAST_EVENTS, "event_backoff_base": 120.0, "event_backoff_max": 240.0}


def waiting_out_a_backoff(store: Store, url: str) -> bool:
    destination = subscriptions.find(store, url)
    ask = partial(outbox_sql.waiting, store.dialect, destination_id=destination.id, now=utcnow())
    return subscriptions.read(store, ask)


async def test_a_destination_delivering_again_gets_what_waits_out_a_backoff_at_once(
    db_url: str, store: Store, executor: Executor
) -> None:
    """An order's first event failed (the endpoint answered 500; its later events are held
    behind it) and waits out its backoff. The endpoint answers again: newer orders' events
    go through, and so, at once, do the old order's, in order, not minutes later (the lag
    grew and /healthz said `events_lagging` meanwhile)."""
    async with Endpoint(mode="500") as endpoint:
        subscriptions.add_webhook(store, endpoint.url, outbox.DEFAULT_TYPES)
        async with relaying(store, saga_settings(db_url, **LONG_BACKOFF)):
            (old,) = await orders(store, executor, 1)
            await wait_until_async(
                lambda: waiting_out_a_backoff(store, endpoint.url), what="the failure recorded"
            )
            endpoint.mode = "ok"
            (new,) = await orders(store, executor, 1)
            want = expected(store, [old, new], outbox.DEFAULT_TYPES)
            await wait_until_async(
                lambda: len(endpoint.requests) >= len(want),
                timeout=30,
                what="the old order's events too, not after their backoff",
            )
    assert sorted(e["id"] for e in endpoint.events()) == sorted(want)
    assert out_of_order(endpoint.events()) == []
    assert not waiting_out_a_backoff(store, endpoint.url)


async def test_a_relay_that_starts_sends_what_waits_out_a_backoff_at_once(
    db_url: str, store: Store, executor: Executor
) -> None:
    """A relay stopped while its endpoint was failing left an event waiting out a long
    backoff; the endpoint is back when the next relay starts: it sends the event (and
    its order's later ones, in order) at once, with no newer event to tell it."""
    settings = saga_settings(db_url, **LONG_BACKOFF)
    async with Endpoint(mode="500") as endpoint:
        subscriptions.add_webhook(store, endpoint.url, outbox.DEFAULT_TYPES)
        async with relaying(store, settings):
            (order,) = await orders(store, executor, 1)
            await wait_until_async(
                lambda: waiting_out_a_backoff(store, endpoint.url), what="the failure recorded"
            )
        want = expected(store, [order], outbox.DEFAULT_TYPES)
        endpoint.mode = "ok"
        async with relaying(store, settings):
            await wait_until_async(
                lambda: len(endpoint.requests) >= len(want),
                timeout=30,
                what="the order's events, not after their backoff",
            )
    assert [e["id"] for e in endpoint.events()] == want


def test_deliveries_succeeding_again_bring_the_waiting_ones_forward_at_most_once_a_minute() -> None:
    """An endpoint that fails one event again and again while the others go through must
    not have that one retried after every batch: `see` answers "bring them forward" once
    per recovery, at most once a minute."""
    now = [0.0]
    watch = FailureWatch("amqp", lambda: now[0])
    failed = transient("broker: refused")
    answers = []
    for at in (0.0, 1.0, 2.0, 3.0, 61.0, 62.0):
        now[0] = at
        answers.append(watch.see([failed] if at % 2 == 0 else [DELIVERED]))
    assert answers == [False, True, False, False, False, False]
    now[0] = 62.5
    assert watch.see([DELIVERED]) is True  # a minute after the last: again
    assert watch.see([DELIVERED]) is False  # nothing failed since


async def test_redeliver_one_event_brings_its_order_s_later_events(
    db_url: str, store: Store, executor: Executor, services_url: str
) -> None:
    settings = saga_settings(db_url, **{**FAST_EVENTS, "event_max_age": 0.2})
    async with Endpoint(mode="500") as endpoint:
        subscriptions.add_webhook(store, endpoint.url, outbox.DEFAULT_TYPES)
        async with relaying(store, settings):
            first, second = await orders(store, executor, 2)
            n_first = len(expected(store, [first], outbox.DEFAULT_TYPES))
            n_all = len(expected(store, [first, second], outbox.DEFAULT_TYPES))
            await wait_until_async(
                lambda: len(subscriptions.deliveries(store, failed=True)) == n_all, what="dead"
            )
            endpoint.mode = "ok"
            revived = subscriptions.redeliver(store, f"{first}:0")
            assert revived.count == n_first
            await wait_until_async(
                lambda: len(endpoint.requests) >= n_first, what="the first order"
            )
    assert [e["subject"] for e in endpoint.events()] == [str(first)] * n_first
    assert out_of_order(endpoint.events()) == []
    assert len(subscriptions.deliveries(store, failed=True)) == n_all - n_first
    bad = run_cli(db_url, services_url, "events", "redeliver", "nope")
    assert bad.exit_code == 2 and "is not an event id" in bad.stderr


async def test_redeliver_a_later_event_revives_its_order_from_the_earliest_dead_one(
    db_url: str, store: Store, executor: Executor, services_url: str
) -> None:
    """The console gives every dead letter its own Redeliver button: asked for a later one,
    the order's earlier dead ones come back too, and go first (revived alone, it would be
    set dead again behind them once the operator had been told it was back in line)."""
    settings = saga_settings(db_url, **{**FAST_EVENTS, "event_max_age": 0.2})
    async with Endpoint(mode="500") as endpoint:
        subscriptions.add_webhook(store, endpoint.url, outbox.DEFAULT_TYPES)
        async with relaying(store, settings):
            (oid,) = await orders(store, executor, 1)
            want = expected(store, [oid], outbox.DEFAULT_TYPES)
            assert len(want) >= 2
            await wait_until_async(
                lambda: len(subscriptions.deliveries(store, failed=True)) == len(want),
                what="dead",
            )
            endpoint.mode = "ok"
            done = run_cli(db_url, services_url, "events", "redeliver", want[-1])
            assert done.exit_code == 0, done.output
            assert done.stdout.strip() == (
                f"{len(want)} deliveries back in line: {want[0]} first"
                " (an earlier dead letter of its order)"
            )
            await wait_until_async(
                lambda: len(endpoint.requests) >= len(want), what="the redelivery"
            )
    assert [e["id"] for e in endpoint.events()] == want
    assert subscriptions.deliveries(store, failed=True) == []


async def test_a_dead_endpoint_delays_neither_orders_nor_other_destinations(
    db_url: str, store: Store, executor: Executor, services_url: str
) -> None:
    settings = saga_settings(db_url, **{**FAST_EVENTS, "event_timeout": 30.0, "relay_lease": 60.0})
    async with Endpoint(mode="hang") as dead:
        subscriptions.add_webhook(store, dead.url, outbox.DEFAULT_TYPES)
        subscribe_sink(store, services_url)
        async with relaying(store, settings):
            ids = await orders(store, executor, 6)  # they finish: nothing waits for a relay
            want = expected(store, ids, outbox.DEFAULT_TYPES)
            await wait_until_async(
                lambda: len(sink_seen(services_url)["events"]) >= len(want), what="the sink"
            )
            sink = label(store, f"{services_url}/sink")
            await wait_until_async(lambda: subscriptions.lags(store)[sink][0] == 0)
            lags = subscriptions.lags(store)
    assert sorted(e["id"] for e in sink_seen(services_url)["events"]) == sorted(want)
    assert dead.requests == []
    assert lags[label(store, dead.url)][0] == len(want)  # all still pending there


async def test_a_webhook_whose_secret_does_not_decode_stops_no_other_and_is_said_once(
    db_url: str, store: Store, executor: Executor, caplog: pytest.LogCaptureFixture
) -> None:
    """A secret that does not decode (edited by hand, cut short) failed the relay's whole
    destination list every 2 s ("cannot read destinations"): the webhooks after it never
    started. Now that one is skipped, said once, and the others deliver."""
    caplog.set_level(logging.WARNING, logger="order_saga.relay")
    settings = saga_settings(db_url, **FAST_EVENTS)
    async with Endpoint() as broken, Endpoint() as good:
        bad = subscriptions.add_webhook(store, broken.url, outbox.DEFAULT_TYPES)  # listed first
        subscriptions.add_webhook(store, good.url, outbox.DEFAULT_TYPES)
        with store.engine.begin() as connection:  # base64 whose padding is cut off
            connection.execute(
                text("UPDATE event_destinations SET secret = 'whsec_abc' WHERE id = :id"),
                {"id": bad.destination.id},
            )
        async with relaying(store, settings) as relay:
            ids = await orders(store, executor, 3)
            want = expected(store, ids, outbox.DEFAULT_TYPES)
            await wait_until_async(lambda: len(good.events()) >= len(want), what="the good one")
            relay._follow(subscriptions.destinations(store))  # the next reads: nothing new
            relay._follow(subscriptions.destinations(store))
    assert sorted(e["id"] for e in good.events()) == sorted(want)
    assert broken.requests == []
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    name = label(store, broken.url)
    (line,) = [m for m in said if name in m]
    assert "signing secret is unreadable" in line, line
    assert f"webhooks rotate {bad.destination.id} --overlap 0" in line, line
    assert not [m for m in said if "cannot read destinations" in m], said


async def test_a_slow_webhook_holding_a_hundred_requests_delays_no_other_webhook(
    db_url: str, store: Store
) -> None:
    """Each webhook has its own connections: one whose endpoint holds more requests than
    aiohttp's default pool (100) leaves none of the others waiting for a connection (they
    used to, until the slow ones timed out, and then failed themselves)."""
    settings = saga_settings(
        db_url, **{**FAST_EVENTS, "event_timeout": 30.0, "relay_lease": 60.0, "relay_batch": 120}
    )

    async def created(n: int) -> list[uuid.UUID]:
        one = partial(
            store.create_order, user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1
        )
        return [order.id for order, _ in await asyncio.gather(*(one() for _ in range(n)))]

    async with Endpoint(mode="hang") as slow, Endpoint() as fast:
        subscriptions.add_webhook(store, slow.url, outbox.DEFAULT_TYPES)
        await created(110)
        async with relaying(store, settings):
            await wait_until_async(lambda: slow.attempts >= 100, what="100 requests held")
            subscriptions.add_webhook(store, fast.url, outbox.DEFAULT_TYPES)
            want = expected(store, await created(5), outbox.DEFAULT_TYPES)
            assert want
            await wait_until_async(  # well within event_timeout
                lambda: len(fast.requests) >= len(want), timeout=15, what="the fast endpoint"
            )
            fast_label = label(store, fast.url)
            await wait_until_async(lambda: subscriptions.lags(store)[fast_label][0] == 0)
        assert slow.requests == []  # still held: nothing timed out meanwhile
    assert sorted(r.event["id"] for r in fast.requests) == sorted(want)
    assert fast.attempts == len(want)  # none failed, none retried


async def test_an_endpoint_s_long_answer_is_not_read_whole_its_connection_is_dropped(
    db_url: str, store: Store
) -> None:
    """The relay reads at most 64 KiB of an answer's body (nobody reads it): an endpoint
    answering 64 MiB costs it no more memory, and the event counts as delivered."""
    total = 64 << 20
    async with Endpoint(answer_bytes=total) as endpoint:
        subscriptions.add_webhook(store, endpoint.url, outbox.DEFAULT_TYPES)
        order, _ = await store.create_order(
            user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1
        )
        want = expected(store, [order.id], outbox.DEFAULT_TYPES)
        async with relaying(store, saga_settings(db_url, **FAST_EVENTS)):
            where = label(store, endpoint.url)
            await wait_until_async(lambda: subscriptions.lags(store)[where][0] == 0)
            await wait_until_async(
                lambda: endpoint.dropped == len(want), timeout=10, what="each answer cut short"
            )
    assert [r.event["id"] for r in endpoint.requests] == want  # each sent once: delivered
    assert [(d.state, d.attempts) for d in subscriptions.deliveries(store)] == [
        ("delivered", 1)
    ] * len(want)
    # What the socket buffers took before the relay hung up, far from the whole body.
    assert endpoint.answered_bytes < len(want) * total / 4


def _json(text: str) -> Any:
    import json

    return json.loads(text)


async def test_an_order_with_undelivered_events_is_not_pruned_then_goes_with_them(
    db_url: str, store: Store, executor: Executor
) -> None:
    from fsm.retention import Pruner

    async with Endpoint(mode="500") as endpoint:
        subscriptions.add_webhook(store, endpoint.url, outbox.DEFAULT_TYPES)
        (order_id,) = await orders(store, executor, 1)  # terminal, its events pending
        assert Pruner(store.engine, older_than=0).run().deleted == 0
        endpoint.mode = "ok"
        async with relaying(store, saga_settings(db_url, **FAST_EVENTS)):
            await wait_until_async(
                lambda: subscriptions.lags(store)[label(store, endpoint.url)][0] == 0,
                what="delivery",
            )
    assert Pruner(store.engine, older_than=0).run().deleted == 1
    assert events_of(store, order_id) == []
    assert subscriptions.deliveries(store, order_id=order_id) == []


async def test_a_trickle_of_events_is_claimed_in_batches_at_most_every_gather(
    db_url: str, store: Store, executor: Executor, services_url: str
) -> None:
    """Orders finishing one after another: the relay claims at most every `relay_gather`
    seconds, so the events share claims and settles (a claim per event or two without)."""
    subscribe_sink(store, services_url)
    gather = 0.4
    settings = saga_settings(db_url, **{**FAST_EVENTS, "relay_gather": gather})
    batches: list[int] = []
    relay = Relay(store, settings, report=lambda _name, ok, failed: batches.append(ok + failed))
    task = asyncio.create_task(relay.run())
    try:
        began = time.monotonic()
        ids = []
        while time.monotonic() - began < 1.2:  # one order at a time, as they come
            ids += await orders(store, executor, 1)
            await asyncio.sleep(0.02)
        want = expected(store, ids, outbox.DEFAULT_TYPES)
        await wait_until_async(lambda: sum(batches) >= len(want), what="every event settled")
        elapsed = time.monotonic() - began
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert len(want) >= 8, "a trickle of several events"
    # (slack for a retried attempt on a loaded machine; ~one batch per event without gather)
    assert len(batches) <= elapsed / gather + 4, (batches, elapsed)
    assert sorted(e["id"] for e in sink_seen(services_url)["events"]) == sorted(want)


async def test_an_order_s_events_in_one_batch_go_one_at_a_time_a_failure_holds_the_next(
    db_url: str, store: Store, executor: Executor
) -> None:
    """Three orders' events wait, then one relay batch takes them all: each order's events
    are sent one after the other in seq order (never two of one order in flight), the
    orders side by side; the first order's first event failing holds its later one back
    (no request for it) until the first is delivered."""
    async with Endpoint(delay=0.05) as endpoint:
        subscriptions.add_webhook(store, endpoint.url, outbox.DEFAULT_TYPES)
        ids = await orders(store, executor, 3)
        want = expected(store, ids, outbox.DEFAULT_TYPES)
        created = f"{ids[0]}:0"
        later = [w for w in want if w.startswith(str(ids[0])) and w != created]
        assert later, "the first order has a later event to hold"
        endpoint.failing.add(created)
        async with relaying(store, saga_settings(db_url, **FAST_EVENTS)):
            await wait_until_async(
                lambda: (
                    len(endpoint.requests) >= len(want) - 1 - len(later)
                    and endpoint.log.count(("start", created)) >= 3
                ),
                what="the other orders delivered, the first event retried",
            )
            sent = {dict(r.headers)["webhook-id"] for r in endpoint.requests}
            assert not sent & {created, *later}
            assert not any(i in later for _kind, i in endpoint.log)  # not even tried
            held = {d.event_id: d for d in subscriptions.deliveries(store, order_id=ids[0])}
            assert {held[i].state for i in [created, *later]} == {"pending"}
            endpoint.failing.clear()
            await wait_until_async(lambda: len(endpoint.requests) >= len(want), what="all")
    assert sorted(e["id"] for e in endpoint.events()) == sorted(want)
    assert out_of_order(endpoint.events()) == []
    # The listing counts attempts: the retried event's from its exception row, 1 for each
    # event the stream delivered at once (no row of its own).
    listed = {
        d.event_id: (d.state, d.attempts)
        for order_id in ids
        for d in subscriptions.deliveries(store, order_id=order_id)
    }
    assert listed.keys() == set(want)
    assert listed[created][0] == "delivered" and listed[created][1] >= 3
    first_time = {i for i in want if i.rpartition(":")[0] != str(ids[0])}
    assert {listed[i] for i in first_time} == {("delivered", 1)}
    in_flight: dict[str, int] = {}
    most = 0
    for kind, event_id in endpoint.log:
        order = event_id.rpartition(":")[0]
        in_flight[order] = in_flight.get(order, 0) + (1 if kind == "start" else -1)
        most = max(most, in_flight[order])
    assert most == 1, "two events of one order in flight at once"
    assert len(in_flight) == 3


async def test_a_changed_destination_s_old_pump_stops_and_its_new_types_are_sent(
    db_url: str, store: Store, executor: Executor
) -> None:
    """A destination changed while a relay runs (its subscription here; a webhook's url,
    the RabbitMQ one re-registered): its old pump, with the old subscription, stops and
    the new one sends the newly subscribed types; a removed one's pump stops. A pump left
    running with the old subscription moved the cursor past the new types unsent."""
    async with Endpoint() as endpoint:
        subscriptions.add_webhook(store, endpoint.url, ("order.created",))
        (destination,) = subscriptions.destinations(store)

        def pumps() -> list[asyncio.Task[Any]]:
            return [t for t in asyncio.all_tasks() if t.get_name() == destination.label]

        async with relaying(store, saga_settings(db_url, **FAST_EVENTS)) as relay:
            await wait_until_async(lambda: len(pumps()) == 1, what="the pump")
            changed = await store.committer.submit(
                partial(
                    outbox_sql.add_destination,
                    store.dialect,
                    name=destination.name,
                    kind="webhook",
                    url=endpoint.url,
                    secret=None,
                    events=outbox.subscription(outbox.DEFAULT_TYPES),
                    now=utcnow(),
                    replace=True,
                )
            )
            assert changed is not None and changed.events != destination.events

            def followed() -> bool:
                entry = relay._pumps.get(destination.id)
                return entry is not None and entry[0] == changed and len(pumps()) == 1

            await wait_until_async(followed, timeout=15, what="only the changed one's pump")
            ids = await orders(store, executor, 6)
            want = expected(store, ids, outbox.DEFAULT_TYPES)
            await wait_until_async(
                lambda: {e["id"] for e in endpoint.events()} >= set(want),
                timeout=15,
                what="the newly subscribed types",
            )
            assert len(pumps()) == 1
            subscriptions.remove(store, destination.name)
            await wait_until_async(lambda: not pumps(), timeout=15, what="the removed one's pump")


async def test_a_batch_stops_sending_well_within_the_cursor_s_lease(
    db_url: str, store: Store
) -> None:
    """One order's ten events in one batch to an endpoint taking 0.2 s each: 2 s one after
    the other, past the 1.5 s lease of the cursor (another relay would take it and send
    the batch again meanwhile). No send starts after a third of the lease: the cursor
    advances past the events sent, the rest stays after it; a relay (its cursor where
    the lease expired) sends all ten, in order, a few at a time."""
    async with Endpoint(delay=0.2) as endpoint:
        added = subscriptions.add_webhook(store, endpoint.url, outbox.DEFAULT_TYPES)
        destination = added.destination
        order_id = uuid.uuid4()

        d = store.dialect

        def write(cursor: Any) -> None:
            for seq in range(10):
                cursor.execute(
                    outbox_sql.insert_event(d),
                    (
                        f"{order_id}:{seq}",
                        d.uuid(order_id),
                        seq,
                        "order.created",
                        d.timestamp(utcnow()),
                        "{}",
                    ),
                )

        await store.committer.submit(write)
        await below_horizon(store)
        settings = saga_settings(
            db_url, **{**FAST_EVENTS, "relay_lease": 1.5, "event_timeout": 0.5}
        )
        relay = Relay(store, settings)
        now = utcnow()
        batch = await store.committer.submit(
            partial(
                outbox_sql.take_batch,
                store.dialect,
                destination_id=destination.id,
                owner="r",
                now=now,
                lease_until=now + timedelta(seconds=1.5),
                limit=100,
            )
        )
        assert batch is not None and len(batch.events) == 10
        keys = signing_keys(added.secret)
        sender = WebhookSender(url=endpoint.url, keys=keys, timeout=1.0, connections=10)
        started = time.monotonic()
        try:
            sent = await relay._send(destination, sender, batch, [])
        finally:
            await sender.aclose()
        took = time.monotonic() - started
        first = len(endpoint.requests)
        async with relaying(store, settings):  # the rest, in batches cut the same way
            await wait_until_async(
                lambda: len(endpoint.requests) >= first + 10, what="every event again"
            )
        ids = [dict(r.headers)["webhook-id"] for r in endpoint.requests[first:]]
        assert ids == [f"{order_id}:{seq}" for seq in range(10)]  # in order, none skipped
    reached = sent.batch.events if sent.batch is not None else []
    assert 1 <= len(reached) < 10, (len(reached), took)
    assert reached == batch.events[: len(reached)]  # the cursor's part: a prefix
    assert [e.event_id for e, a in sent.stream if a is not None and a.delivered] == [
        e.event_id for e in reached
    ]
    assert first == len(reached)


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("http://a..b/hook?token=T0KEN", "UnicodeError"),
        (f"http://{'x' * 64}.example/hook?token=T0KEN", "UnicodeError"),
        # aiohttp's InvalidUrlClientError: a ClientError, whose message is the whole URL
        ("http://hooks\u200b.example/hook?token=T0KEN", "InvalidUrlClientError"),
    ],
)
async def test_a_webhook_whose_host_name_no_request_can_use_is_dead_lettered(
    url: str,
    error: str,
    db_url: str,
    store: Store,
    executor: Executor,
    services_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Stored before `webhooks add` refused such URLs: the relay dead-letters its events at
    once (aiohttp raises a ValueError for the host), the cursor moves on, and neither the
    log nor the stored error carries the URL's token; `webhooks test` says why in one
    line."""
    caplog.set_level(logging.WARNING, logger="order_saga")
    with pytest.raises(ValueError, match="is not a valid host name|a request can go to"):
        subscriptions.webhook_url(url)  # `webhooks add` refuses it (tests/test_cli.py)
    bad = await store.committer.submit(
        partial(
            outbox_sql.add_destination,
            store.dialect,
            name=url,
            kind="webhook",
            url=url,
            secret=new_secret(),
            events=outbox.subscription(outbox.DEFAULT_TYPES),
            now=utcnow(),
        )
    )
    assert bad is not None
    settings = saga_settings(db_url, **{**FAST_EVENTS, "event_max_age": 60.0})
    async with relaying(store, settings):
        ids = await orders(store, executor, 2)
        want = expected(store, ids, outbox.DEFAULT_TYPES)

        def all_dead() -> bool:
            return len(subscriptions.deliveries(store, failed=True)) == len(want)

        await wait_until_async(all_dead, what="every delivery dead-lettered")
        await wait_until_async(lambda: subscriptions.lags(store)[bad.label][0] == 0, what="no lag")
    errors = {d.last_error for d in subscriptions.deliveries(store, failed=True)}
    assert any(e and e.startswith(f"unusable URL: {error}") for e in errors), errors
    assert not [e for e in errors if e and "T0KEN" in e], errors
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "dead-lettered" in logged and "T0KEN" not in logged, logged
    tested = await asyncio.to_thread(run_cli, db_url, services_url, "webhooks", "test", str(bad.id))
    assert tested.exit_code == 1, tested.output
    assert tested.stderr.startswith(f"order-saga: {url}: unusable URL: {error}")
    assert len(tested.stderr.strip().splitlines()) == 1


async def test_the_amqp_destination_can_be_removed_and_a_relay_with_the_url_adds_it_back(
    db_url: str, store: Store, services_url: str
) -> None:
    """ORDER_SAGA_AMQP_URL unset later: its cursor's lag would grow forever (and hold back
    retention) unless the operator can remove it."""
    await register_amqp(store, saga_settings(db_url, amqp_url="amqp://u:p@127.0.0.1:1/"))
    removed = run_cli(db_url, services_url, "webhooks", "remove", AMQP_DESTINATION)
    assert removed.exit_code == 0, removed.output
    assert removed.stdout.startswith("removed amqp ")
    assert [d.kind for d in subscriptions.destinations(store)] == []
    listed = run_cli(db_url, services_url, "webhooks", "list", "--json")
    assert _json(listed.stdout) == {"destinations": []}
    await register_amqp(store, saga_settings(db_url, amqp_url="amqp://u:p@127.0.0.1:1/"))
    back = subscriptions.destinations(store)
    assert [(d.kind, d.name) for d in back] == [("amqp", AMQP_DESTINATION)]
    by_id = run_cli(db_url, services_url, "webhooks", "remove", str(back[0].id))
    assert by_id.exit_code == 0, by_id.output
    assert subscriptions.destinations(store) == []


async def test_a_relay_whose_database_fails_at_start_keeps_trying(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The AMQP destination's registration fails (no schema yet): the relay goes on trying,
    as for the destinations' read, instead of dying (a `serve`'s relay child restarted every
    second, forever)."""
    caplog.set_level(logging.WARNING, logger="order_saga.relay")
    url = f"sqlite:///{tmp_path}/later.db"
    settings = saga_settings(url, **FAST_EVENTS, amqp_url="amqp://u:p@127.0.0.1:1/")
    with open_store(settings) as store:
        relay = Relay(store, settings)
        task = asyncio.create_task(relay.run())
        try:
            with pytest.raises(Exception, match="event_destinations"):
                subscriptions.destinations(store)
            await wait_until_async(
                lambda: task.done() or "cannot register the amqp destination" in caplog.text,
                what="the first registration failed",
            )
            await asyncio.to_thread(SQLModel.metadata.create_all, store.engine)
            await wait_until_async(
                lambda: task.done() or bool(subscriptions.destinations(store)),
                timeout=15,
                what="the amqp destination registered",
            )
            assert not task.done(), task
            assert [d.name for d in subscriptions.destinations(store)] == [AMQP_DESTINATION]
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_redeliver_with_a_seq_beyond_any_column_is_one_line(
    db_url: str, store: Store, services_url: str
) -> None:
    huge = run_cli(db_url, services_url, "events", "redeliver", f"{uuid.uuid4()}:{10**20}")
    assert huge.exit_code == 2, huge.output
    assert "its seq is out of range" in huge.stderr


async def test_dead_letters_show_in_metrics_and_degrade_healthz(
    db_url: str, store: Store, executor: Executor, services_url: str
) -> None:
    """A dead letter is neither pending nor lag (the relay no longer tries it), yet it holds
    its order's later events for good: its own gauge, and /healthz `events_dead`, under the
    destination's public label (never the URL: its path or query may hold a token)."""
    settings = saga_settings(db_url, **{**FAST_EVENTS, "event_max_age": 0.2})
    async with Endpoint(mode="500") as endpoint:
        url = f"{endpoint.url}/T0KENPATH?token=Q5ECRET"
        subscriptions.add_webhook(store, url, outbox.DEFAULT_TYPES)
        destination = subscriptions.find(store, url)
        async with relaying(store, settings):
            ids = await orders(store, executor, 1)
            n = len(expected(store, ids, outbox.DEFAULT_TYPES))
            await wait_until_async(
                lambda: len(subscriptions.deliveries(store, failed=True)) == n, what="dead"
            )
    assert subscriptions.lags(store)[destination.label] == (0, 0.0, n)
    with api(db_url, services_url, event_lag_degraded=3600) as client:
        health = client.get("/healthz").json()
        text = client.get("/metrics").text
    assert health["status"] == "degraded", health
    assert health["events_lagging"] == {}
    assert health["events_dead"] == {destination.label: n}
    assert f'order_saga_outbox_dead{{destination="{destination.label}"}} {n}.0' in text
    assert f'order_saga_outbox_lag_seconds{{destination="{destination.label}"}} 0.0' in text
    assert "T0KENPATH" not in text + json.dumps(health)
    subscriptions.redeliver(store, None)  # back in line: pending and lagging, no longer dead
    assert subscriptions.lags(store)[destination.label][::2] == (n, 0)


@pytest.mark.parametrize("mode", ["500", "not_http"])
async def test_a_webhook_s_secret_path_and_query_stay_out_of_metrics_healthz_and_logs(
    mode: Mode,
    db_url: str,
    store: Store,
    executor: Executor,
    services_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A webhook URL's path and query may hold a token (Slack, Discord). /metrics and
    /healthz are public even when a token is configured: they, and the relay's log lines,
    name the destination `webhook:<id> scheme://host:port`, never by its URL; nor do the
    errors stored (aiohttp's error for an answer that is not HTTP ends in the URL)."""
    caplog.set_level(logging.DEBUG, logger="order_saga")
    secrets = ("T0KENPATH", "Q5ECRET")
    async with Endpoint(mode=mode) as endpoint:
        url = f"{endpoint.url}/T0KENPATH?token=Q5ECRET"
        subscriptions.add_webhook(store, url, outbox.DEFAULT_TYPES)
        destination = subscriptions.find(store, url)
        port = endpoint.url.split(":")[2].split("/")[0]
        assert destination.label == f"webhook:{destination.id} http://127.0.0.1:{port}"
        # Failed, retried, then dead-lettered past event_max_age: the relay's warnings.
        settings = saga_settings(db_url, **{**FAST_EVENTS, "event_max_age": 0.5})
        async with relaying(store, settings):
            await orders(store, executor, 1)
            await wait_until_async(
                lambda: any(
                    "dead-lettered" in r.getMessage() and destination.label in r.getMessage()
                    for r in caplog.records
                ),
                what="a dead letter logged",
            )
        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert not [s for s in secrets if s in logged], logged
        errors = str([d.last_error for d in subscriptions.deliveries(store, failed=True)])
        assert "HTTP 500" in errors or "answer: ClientResponseError: " in errors, errors
        assert not [s for s in secrets if s in errors], errors
        await orders(store, executor, 1)  # pending, lagging (no relay meanwhile)
        await below_horizon(store)
        with api(db_url, services_url, event_lag_degraded=0.001) as client:
            health = wait_until(
                lambda: (h := client.get("/healthz").json())["events_lagging"] and h,
                what="a lagging destination",
            )
            text = client.get("/metrics").text
    assert list(health["events_lagging"]) == [destination.label]
    assert f'order_saga_outbox_pending{{destination="{destination.label}"}}' in text
    assert not [s for s in secrets if s in text or s in json.dumps(health)]


@pytest.mark.slow
async def test_a_ctrl_c_stops_serve_s_relay_child_only_through_serve(
    db_url: str, store: Store, downstream: Downstream
) -> None:
    """Ctrl-C reaches the terminal's whole foreground process group. The relay child is
    not in it: it stops when `serve` stops it, after the grace, never on its own while
    `serve` waits out a request (which made its supervisor start another)."""
    alembic_command.stamp(alembic_config(db_url), "head")  # the fixture's schema is current
    subscribe_sink(store, downstream.url)  # a destination: serve starts its relay child
    env = saga_env(database_url=db_url, services_url=downstream.url, shutdown_grace=30)
    downstream.fault("product.get", "delay", count=1, seconds=3)  # holds the grace open
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with Saga(command("serve", "--port", str(port), "--no-sweep"), env, session=True) as serve:
        wait_until(lambda: answers(f"{url}/healthz"), what="serve", alive=serve.running)
        wait_until(lambda: children(serve.process.pid), what="its relay", alive=serve.running)
        body = {"user_id": RICH_USER_ID, "product_id": WIDGET_ID, "quantity": 1}
        placing = asyncio.create_task(
            asyncio.to_thread(httpx.post, f"{url}/orders", json=body, timeout=30)
        )
        await wait_until_async(  # the loop runs on: the request is sent meanwhile
            lambda: _moved(store), what="the request's product lookup in flight"
        )
        os.killpg(serve.process.pid, signal.SIGINT)  # Ctrl-C at the terminal
        placed = await placing
        stopped = serve.wait()
    assert placed.status_code == 201, placed.text
    assert stopped.returncode == 0, stopped.explain()
    assert "starting another" not in stopped.stderr, stopped.explain()


def _moved(store: Store) -> bool:
    with store.engine.connect() as conn:
        return bool(conn.execute(text("SELECT 1 FROM orders WHERE state <> 'pending'")).first())
