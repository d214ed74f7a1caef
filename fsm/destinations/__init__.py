"""Where order events go: one sender per destination kind (`webhook`, `amqp`), each
answering one delivery attempt with an `Attempt`. Senders never touch the database and
never decide when to retry (fsm.relay does both).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from fsm.outbox_sql import Claimed


@dataclass(frozen=True)
class Attempt:
    """One attempt's outcome: delivered, worth retrying (5xx, timeout, connection), or
    refused for good (the endpoint answered 4xx: the same request would be refused again)."""

    delivered: bool
    retry: bool = False
    error: str | None = None


DELIVERED = Attempt(delivered=True)


def transient(error: str) -> Attempt:
    return Attempt(delivered=False, retry=True, error=error)


def refused(error: str) -> Attempt:
    return Attempt(delivered=False, retry=False, error=error)


class Sender(Protocol):
    async def send(self, event: Claimed) -> Attempt: ...

    async def aclose(self) -> None: ...
