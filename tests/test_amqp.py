"""The RabbitMQ destination (issue 19 item 3) against the machine's real broker: every event
published to the durable topic exchange, routing key = type, persistent, message_id = event
id, counted delivered only once confirmed; the broker out of reach (a TCP proxy the test
cuts, the broker itself untouched) delays nothing and loses nothing. Both databases."""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

import aio_pika
import pytest

from fsm import metrics, outbox, subscriptions
from fsm.destinations.amqp import AmqpSender
from fsm.executor import Executor
from fsm.migrate import upgrade
from fsm.outbox_sql import Claimed
from fsm.relay import AMQP_DESTINATION
from fsm.store import Store, utcnow
from tests.support.amqp import BROKER, consuming
from tests.support.events import FAST_EVENTS, expected, orders, out_of_order, relaying
from tests.support.processes import Saga, command
from tests.support.proxy import CuttableProxy
from tests.support.services import free_port
from tests.support.settings import saga_env, saga_settings
from tests.support.waiting import wait_until, wait_until_async


async def test_every_event_is_published_confirmed_in_order(
    db_url: str, store: Store, executor: Executor
) -> None:
    settings = saga_settings(db_url, **FAST_EVENTS, amqp_url=BROKER)
    async with consuming() as consumer, relaying(store, settings):
        await wait_until_async(
            lambda: bool(subscriptions.destinations(store)), what="the destination"
        )
        ids = await orders(store, executor, 9)
        want = expected(store, ids, outbox.DEFAULT_TYPES)
        subjects = {str(i) for i in ids}
        await wait_until_async(lambda: len(consumer.of(subjects)) >= len(want), what="the messages")
        (destination,) = subscriptions.destinations(store)
        assert (
            destination.name == AMQP_DESTINATION and destination.url == "amqp://***@127.0.0.1:5672/"
        )
    messages = consumer.of(subjects)
    assert sorted(m.message_id or "" for m in messages) == sorted(want)
    for message in messages:
        event = json.loads(message.body)
        assert message.message_id == event["id"]
        assert message.routing_key == message.type == event["type"]
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert message.content_type == outbox.CONTENT_TYPE
    assert out_of_order(consumer.events(subjects)) == []
    (backlog,) = subscriptions.backlog(store)
    assert (backlog.pending, backlog.dead) == (0, 0)


async def test_the_broker_out_of_reach_delays_nothing_and_loses_nothing(
    db_url: str, store: Store, executor: Executor
) -> None:
    """The outage lasts until the relay has failed to publish, with orders completing
    meanwhile (a few seconds; the issue's 30 s shortened to keep the suite fast)."""
    with CuttableProxy(5672) as proxy:
        async with consuming() as consumer:
            url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
            settings = saga_settings(
                db_url, **{**FAST_EVENTS, "amqp_url": url, "event_timeout": 0.5}
            )
            async with relaying(store, settings):
                await wait_until_async(
                    lambda: bool(subscriptions.destinations(store)), what="the destination"
                )
                before = await orders(store, executor, 3)
                subjects = {str(i) for i in before}
                n_before = len(expected(store, before, outbox.DEFAULT_TYPES))
                await wait_until_async(
                    lambda: len(consumer.of(subjects)) >= n_before, what="before"
                )
                failures = metrics.outbox_failed(AMQP_DESTINATION)._value.get()

                proxy.cut()
                during = await orders(store, executor, 6)  # they complete: nothing waits for it
                assert {store.get(i).status for i in during} <= {"completed", "failed", "rejected"}
                n_during = len(expected(store, during, outbox.DEFAULT_TYPES))
                await wait_until_async(
                    lambda: metrics.outbox_failed(AMQP_DESTINATION)._value.get() > failures,
                    what="a failed publish",
                )
                pending = subscriptions.lags(store)[AMQP_DESTINATION][0]
                assert pending == n_during  # the backlog grew

                proxy.restore()
                subjects |= {str(i) for i in during}
                await wait_until_async(
                    lambda: (
                        len({m.message_id for m in consumer.of(subjects)}) >= n_before + n_during
                    ),
                    timeout=60,
                    what="the backlog to drain",
                )
    want = expected(store, before + during, outbox.DEFAULT_TYPES)
    got = {m.message_id for m in consumer.of(subjects)}
    assert got == set(want)  # nothing lost (a publish cut before its confirm may repeat)
    first_seen: list[dict[str, object]] = []
    seen_ids: set[str] = set()
    for event in consumer.events(subjects):
        if event["id"] not in seen_ids:
            seen_ids.add(str(event["id"]))
            first_seen.append(event)
    assert out_of_order(first_seen) == []  # type: ignore[arg-type]


async def test_a_wrong_password_is_logged_once_with_the_broker_s_error_not_the_password(
    db_url: str, store: Store, executor: Executor, caplog: pytest.LogCaptureFixture
) -> None:
    """The broker refuses the relay's login: `events list` shows each attempt's error, and
    the log says so once (serve's log had nothing but a degraded /healthz)."""
    caplog.set_level(logging.INFO, logger="order_saga.relay")
    wrong = BROKER.replace("guest:guest@", "guest:not-the-password@")
    settings = saga_settings(db_url, **{**FAST_EVENTS, "amqp_url": wrong})

    def warned() -> list[str]:
        lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        return [line for line in lines if line.startswith(f"relay {AMQP_DESTINATION}: ")]

    async with relaying(store, settings):
        await wait_until_async(
            lambda: bool(subscriptions.destinations(store)), what="the destination"
        )
        await orders(store, executor, 2)
        await wait_until_async(warned, timeout=30, what="the warning")
        failures = metrics.outbox_failed(AMQP_DESTINATION)._value.get()
        await wait_until_async(
            lambda: metrics.outbox_failed(AMQP_DESTINATION)._value.get() >= failures + 3,
            timeout=30,
            what="more refused publishes",
        )
    (line,) = warned()  # once, however many publishes were refused
    assert line.startswith(f"relay {AMQP_DESTINATION}: deliveries failing: ")
    assert "ACCESS_REFUSED" in line, line
    assert "not-the-password" not in caplog.text


@pytest.mark.parametrize("password", ["guest", "not-the-password"])
async def test_the_broker_is_tried_at_start_and_a_wrong_password_told_on_an_idle_database(
    password: str, db_url: str, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """No order, no event: the relay tries the broker (connect, declare the exchange) as
    it starts and warns in one line when that fails (a wrong password was silent until the
    first order); it says when it starts, naming its destinations, and when it stops;
    never the password."""
    caplog.set_level(logging.DEBUG, logger="order_saga.relay")
    url = BROKER.replace("guest:guest@", f"guest:{password}@")
    settings = saga_settings(db_url, **{**FAST_EVENTS, "amqp_url": url})

    def said(level: int, start: str = "") -> list[str]:
        lines = [r.getMessage() for r in caplog.records if r.levelno == level]
        return [line for line in lines if line.startswith(start)]

    async with relaying(store, settings):
        await wait_until_async(lambda: said(logging.INFO, "relay started: "), what="the start")
        if password == "guest":
            await wait_until_async(
                lambda: said(logging.DEBUG, "relay: RabbitMQ at "), what="the broker reached"
            )
        else:
            await wait_until_async(lambda: said(logging.WARNING), timeout=30, what="a warning")
    where = "amqp://***@127.0.0.1:5672/"
    assert said(logging.INFO) == [
        f"relay started: delivering to amqp {where}; the destination list is read again every 2 s",
        "relay stopped",
    ]
    if password == "guest":
        assert said(logging.WARNING) == []
    else:
        (warning,) = said(logging.WARNING)
        assert warning.startswith(f"relay: cannot reach RabbitMQ at {where} (events to it wait")
        assert "ProbableAuthenticationError: ACCESS_REFUSED" in warning, warning
        assert "not-the-password" not in caplog.text


def test_order_saga_relay_tells_a_wrong_password_at_start_and_when_it_stops(
    tmp_path: Path,
) -> None:
    """The command as run: an idle database, a wrong password, SIGTERM: its log says it
    started (RabbitMQ named, password masked), could not log in, stopped; exit 0."""
    url = f"sqlite:///{tmp_path}/saga.db"
    upgrade(url)
    wrong = BROKER.replace("guest:guest@", "guest:not-the-password@")
    with Saga(command("relay"), saga_env(database_url=url, amqp_url=wrong)) as relay:
        wait_until(
            lambda: "ACCESS_REFUSED" in relay.stderr_so_far(),
            what="the warning",
            alive=relay.running,
            explain=relay.stderr_so_far,
        )
        result = relay.stop()
    assert result.returncode == 0, result.explain()
    logged = result.stderr.splitlines()
    masked = "amqp://***@127.0.0.1:5672/"
    assert len(logged) == 3, result.explain()  # the warning and the start line: either first
    assert any(
        f" WARNING order_saga.relay [-] relay: cannot reach RabbitMQ at {masked} " in line
        for line in logged
    ), result.explain()
    assert any(
        f" INFO order_saga.relay [-] relay started: delivering to amqp {masked};" in line
        for line in logged
    ), result.explain()
    assert logged[-1].endswith(" INFO order_saga.relay [-] relay stopped"), result.explain()
    assert "not-the-password" not in result.stdout + result.stderr


async def test_the_client_library_s_errors_are_debug_lines_while_the_broker_is_away(
    db_url: str, store: Store, executor: Executor, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing listens on the broker's port: aiormq logged an ERROR at every connect
    attempt (`error when creating transport`), past the relay's own warnings (at most once
    a minute). Now they are DEBUG lines, shown only where DEBUG is on; the relay warns
    twice: its start's check, its deliveries failing."""
    caplog.set_level(logging.INFO, logger="order_saga.relay")
    for name in ("aiormq", "aio_pika"):  # last: the capture's own level is the last one set
        caplog.set_level(logging.DEBUG, logger=name)
    url = f"amqp://guest:a-password@127.0.0.1:{free_port()}/"
    settings = saga_settings(db_url, **{**FAST_EVENTS, "amqp_url": url})
    async with relaying(store, settings):
        await wait_until_async(
            lambda: bool(subscriptions.destinations(store)), what="the destination"
        )
        failures = metrics.outbox_failed(AMQP_DESTINATION)._value.get()
        await orders(store, executor, 2)
        await wait_until_async(
            lambda: metrics.outbox_failed(AMQP_DESTINATION)._value.get() >= failures + 5,
            timeout=30,
            what="five failed publishes",
        )
    client = [r for r in caplog.records if r.name.startswith(("aiormq", "aio_pika"))]
    assert [r.getMessage() for r in client if r.levelno >= logging.WARNING] == []
    refused = [r for r in client if "error when creating transport" in r.getMessage()]
    assert len(refused) >= 5 and {r.levelname for r in refused} == {"DEBUG"}
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 2, warned
    assert warned[0].startswith("relay: cannot reach RabbitMQ at ") or warned[1].startswith(
        "relay: cannot reach RabbitMQ at "
    )
    assert "a-password" not in caplog.text


async def test_a_late_failure_closes_only_the_connection_it_was_sent_on() -> None:
    """A publish that failed on a connection since replaced (its confirm timed out after
    another send had reset it and a third opened a new one) closes that old connection,
    not the new one: the sends in flight on the new one go on."""
    sender = AmqpSender(url=BROKER, timeout=5.0)
    now = utcnow()

    def event(n: int) -> Claimed:
        order_id = uuid.uuid4()
        # A body as the events' (a parallel test's consumer reads its subject).
        body = json.dumps({"id": f"{order_id}:{n}", "subject": str(order_id)})
        return Claimed(f"{order_id}:{n}", order_id, n, 0, now, now, "order.created", body)

    try:
        assert (await sender.send(event(0))).delivered
        old = sender._connection
        assert not (await sender._failed(ConnectionError("cut"), old)).delivered
        assert old.is_closed and sender._connection is None
        assert (await sender.send(event(1))).delivered
        new = sender._connection
        assert new is not None and new is not old
        await sender._failed(TimeoutError(), old)  # noticed late, on the old connection
        assert sender._connection is new and not new.is_closed
        assert (await sender.send(event(2))).delivered and sender._connection is new
    finally:
        await sender.aclose()
