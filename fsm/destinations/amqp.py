"""RabbitMQ delivery (aio-pika): each event published to the durable topic exchange
`order-saga.events`, routing key = event type, persistent, `message_id` = event id, on a
channel in publisher-confirm mode: `send` answers delivered only once the broker confirmed
the message. One connection per relay, re-opened after any failure. No retries here.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
from aio_pika.abc import AbstractExchange, AbstractRobustConnection

from fsm.destinations import DELIVERED, Attempt, transient
from fsm.outbox import CONTENT_TYPE
from fsm.outbox_sql import Claimed

EXCHANGE = "order-saga.events"


class AmqpSender:
    def __init__(self, *, url: str, timeout: float) -> None:
        self.url, self.timeout = url, timeout
        self._connection: Any = None
        self._exchange: AbstractExchange | None = None
        self._lock = asyncio.Lock()

    async def _open(self) -> AbstractExchange:
        async with self._lock:
            if self._exchange is not None:
                return self._exchange
            connection: AbstractRobustConnection | Any = await aio_pika.connect(
                self.url, timeout=self.timeout
            )
            try:
                channel = await connection.channel(publisher_confirms=True)
                self._exchange = await channel.declare_exchange(
                    EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
                )
            except BaseException:
                await connection.close()
                raise
            self._connection = connection
            return self._exchange

    async def send(self, event: Claimed) -> Attempt:
        message = aio_pika.Message(
            body=event.body.encode(),
            content_type=CONTENT_TYPE,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=event.event_id,
            type=event.type,
            timestamp=event.created_at,
        )
        try:
            # One timeout for both awaits (asyncio.wait_for would start a task for each).
            async with asyncio.timeout(self.timeout):
                exchange = await self._open()
                # publisher confirms: returns once the broker has taken responsibility. Not
                # `mandatory`: an event no queue is bound for is confirmed all the same, and
                # the broker would send each such message's whole body back to the relay.
                await exchange.publish(message, routing_key=event.type, mandatory=False)
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the relay is stopping
            return await self._failed(exc)  # the connection died under the publish
        except Exception as exc:  # timeout, broker or connection error, a nack
            return await self._failed(exc)
        return DELIVERED

    async def _failed(self, exc: BaseException) -> Attempt:
        await self._reset()
        return transient(f"broker: {type(exc).__name__}: {exc}".strip().rstrip(":"))

    async def _reset(self) -> None:
        connection, self._connection, self._exchange = self._connection, None, None
        if connection is not None:
            try:
                await asyncio.wait_for(connection.close(), self.timeout)
            except Exception:  # already broken: nothing to close cleanly
                pass

    async def aclose(self) -> None:
        await self._reset()
