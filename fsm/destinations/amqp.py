"""RabbitMQ delivery (aio-pika): each event published to the durable topic exchange
`order-saga.events`, routing key = event type, persistent, `message_id` = event id, on a
channel in publisher-confirm mode: `send` answers delivered only once the broker confirmed
the message. One connection per relay, re-opened after any failure. No retries here.

A message goes out on the aiormq channel under aio-pika's (`basic_publish`) with
`wait=False`: a publish does not hold the channel's lock until the writer task has put its
frame on the socket, so a batch's publishes are queued at once and their confirms awaited
together (aio-pika's `Exchange.publish` waits for each write in turn: a batch went out one
loop round trip per message). Nothing is weaker: `send` still returns delivered only once
the broker confirmed the message (a nack, a closed channel or the timeout is a failure).

The client libraries' own warnings and errors (aiormq's `error when creating transport`
at every attempt while the broker is away, ...) are DEBUG lines (`quiet_client_logs`): the
relay says what failed itself, at most once a minute per destination.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustConnection

from fsm.destinations import DELIVERED, Attempt, transient
from fsm.outbox import CONTENT_TYPE
from fsm.outbox_sql import Claimed
from fsm.text import storable

EXCHANGE = "order-saga.events"
PERSISTENT = int(aio_pika.DeliveryMode.PERSISTENT)  # 2: written to disk by the broker


class _Demoted(logging.Filter):
    """A WARNING or ERROR of aiormq's or aio-pika's made a DEBUG line (kept only where DEBUG
    is on for that logger), its text on one line, passwords masked. aiormq logs an error at
    each failed connect (one per attempt: 7 in 6 s for an unknown host) past the relay's
    own warning, which says it at most once a minute."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        record.msg, record.args = storable(record.getMessage()), ()
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


# aiormq logs a frame sent after close on a child of its connection's logger, made when
# first used: made here, so it gets the filter too.
_CLIENT_LOGGERS = ("aiormq.connection.marshall",)


def quiet_client_logs() -> None:
    """`_Demoted` on every logger of aiormq and aio-pika (a logger's filter does not apply
    to its children's records: each one gets its own). Once per process."""
    names = {*_CLIENT_LOGGERS, "aiormq", "aio_pika"}
    names |= {n for n in logging.root.manager.loggerDict if n.startswith(("aiormq.", "aio_pika."))}
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Demoted) for f in logger.filters):
            logger.addFilter(_Demoted())


class _Connection(aio_pika.Connection):
    """aio-pika's connection, closed when its connect fails. Left as it was, its `__del__`
    schedules the close from wherever the garbage collector runs: in a thread without an
    event loop (the read pool's), a coroutine never awaited, the warning an error under
    the tests' `filterwarnings`."""

    async def connect(self, timeout: aio_pika.abc.TimeoutType = None) -> None:
        try:
            await super().connect(timeout)
        except BaseException:
            await self.close()
            raise


class AmqpSender:
    def __init__(self, *, url: str, timeout: float) -> None:
        self.url, self.timeout = url, timeout
        quiet_client_logs()
        self._connection: Any = None
        self._pika_channel: Any = None  # held: it owns the aiormq channel published on
        self._channel: aiormq.Channel | None = None
        self._lock = asyncio.Lock()

    async def _open(self) -> tuple[Any, aiormq.Channel]:
        """The current connection and its channel (opened if there is none)."""
        async with self._lock:
            if self._channel is not None:
                return self._connection, self._channel
            connection: AbstractRobustConnection | Any = await aio_pika.connect(
                self.url, timeout=self.timeout, connection_class=_Connection
            )
            try:
                channel = await connection.channel(publisher_confirms=True)
                await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
                # aiormq's own Channel: its basic_publish takes `wait`.
                self._channel = cast(aiormq.Channel, await channel.get_underlay_channel())
                self._pika_channel = channel
            except BaseException:
                await connection.close()
                raise
            self._connection = connection
            return connection, self._channel

    async def check(self) -> Attempt:
        """Connect and declare the exchange, as the first send does: delivered, or the
        error a send would store (the relay's start: a wrong URL or password told before
        the first event, not after it). The connection is kept for the sends that follow."""
        used: Any = None
        try:
            async with asyncio.timeout(self.timeout):
                used, _channel = await self._open()
        except Exception as exc:  # timeout, refused login, unknown host, ...
            return await self._failed(exc, used)
        return DELIVERED

    async def send(self, event: Claimed) -> Attempt:
        properties = aiormq.spec.Basic.Properties(
            content_type=CONTENT_TYPE,
            delivery_mode=PERSISTENT,
            message_id=event.event_id,
            message_type=event.type,
            timestamp=event.created_at,
        )
        used: Any = None  # the connection this publish went out on
        try:
            # One timeout for both awaits (asyncio.wait_for would start a task for each).
            async with asyncio.timeout(self.timeout):
                used, channel = await self._open()
                # publisher confirms: returns once the broker has taken responsibility. Not
                # `mandatory`: an event no queue is bound for is confirmed all the same, and
                # the broker would send each such message's whole body back to the relay.
                await channel.basic_publish(
                    event.body.encode(),
                    exchange=EXCHANGE,
                    routing_key=event.type,
                    properties=properties,
                    mandatory=False,
                    wait=False,
                )
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the relay is stopping
            return await self._failed(exc, used)  # the connection died under the publish
        except Exception as exc:  # timeout, broker or connection error, a nack
            return await self._failed(exc, used)
        return DELIVERED

    async def _failed(self, exc: BaseException, used: Any) -> Attempt:
        """A publish on `used` failed (None: no connection was opened for it)."""
        await self._reset(used)
        return transient(f"broker: {type(exc).__name__}: {exc}".strip().rstrip(":"))

    async def _reset(self, used: Any) -> None:
        """Close `used`, and forget it if it is still the current connection. Only that one:
        a failure noticed late (a confirm that timed out on a connection already replaced)
        must not close the connection another send has just opened, failing every publish
        in flight on it."""
        if used is None:
            return
        if used is self._connection:
            self._connection = self._channel = self._pika_channel = None
        try:
            await asyncio.wait_for(used.close(), self.timeout)
        except Exception:  # already broken (or closed): nothing to close cleanly
            pass

    async def aclose(self) -> None:
        await self._reset(self._connection)
