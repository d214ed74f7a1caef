"""A RabbitMQ consumer for tests: an exclusive queue bound to `order-saga.events` with `#`,
collecting every message (the broker is shared: callers filter by their own orders)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from fsm.destinations.amqp import EXCHANGE

BROKER = "amqp://guest:guest@127.0.0.1:5672/"


class Collected:
    def __init__(self) -> None:
        self.messages: list[AbstractIncomingMessage] = []

    def of(self, subjects: set[str]) -> list[AbstractIncomingMessage]:
        import json

        return [m for m in self.messages if json.loads(m.body)["subject"] in subjects]

    def events(self, subjects: set[str]) -> list[dict[str, Any]]:
        import json

        return [json.loads(m.body) for m in self.of(subjects)]


@asynccontextmanager
async def consuming(url: str = BROKER) -> AsyncIterator[Collected]:
    collected = Collected()
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, routing_key="#")

        async def take(message: AbstractIncomingMessage) -> None:
            collected.messages.append(message)
            await message.ack()

        await queue.consume(take)
        yield collected
    finally:
        await connection.close()
