"""The outbox relay: delivers pending order events to every destination, at least once and
in order per order, and records each delivery. Runs alone as `order-saga relay`, and for
`serve` and `worker` as their child process (fsm.relay_child); any number share the work.

One task per destination, so a slow or dead endpoint delays only its own deliveries; the
orders never wait for a relay (their events are already committed). A task leases a batch
of deliveries (each the oldest undelivered event of its order, fsm.outbox_sql.claim), sends
them concurrently, then records delivered / retry at (exponential backoff with jitter) /
dead letter (a refusal, or past `event_max_age` since the event or its redelivery), in the
transaction that claims its next batch. A relay killed mid-delivery (or before recording
it) leaves its leases to expire: the next relay sends those events again.
Every database access goes through the store's group-commit thread. Decides nothing about
orders, and never writes one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from fsm import metrics, outbox, outbox_sql
from fsm.destinations import Attempt, Sender
from fsm.outbox_sql import Claimed, Destination
from fsm.settings import Settings
from fsm.store import Store, utcnow
from fsm.subscriptions import destinations, read

log = logging.getLogger("order_saga.relay")
AMQP_DESTINATION = "amqp"
# How often the relay re-reads the destination list (a webhook added by the CLI).
REFRESH_SECONDS = 2.0


def backoff(attempts: int, *, base: float, cap: float) -> float:
    """Seconds before attempt `attempts + 1`: doubling from `base`, capped, full jitter
    over its upper half (relays that failed together do not retry together)."""
    ceiling = min(cap, base * 2 ** max(0, attempts - 1))
    return random.uniform(ceiling / 2, ceiling)


def masked(url: str) -> str:
    """The URL with its password replaced (what is stored and shown)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


async def register_amqp(store: Store, settings: Settings) -> None:
    """The RabbitMQ destination, once ORDER_SAGA_AMQP_URL is set: events committed from
    then on are fanned out to it (its URL stored with the password masked)."""
    if settings.amqp_url is None:
        return
    await store.committer.submit(
        partial(
            outbox_sql.add_destination,
            store.dialect,
            name=AMQP_DESTINATION,
            kind="amqp",
            url=masked(settings.amqp_url),
            secret=None,
            events=outbox.subscription(outbox.DEFAULT_TYPES),
            now=utcnow(),
            replace=True,
        )
    )


class Relay:
    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        owner: str | None = None,
        report: Callable[[str, int, int], None] | None = None,
    ) -> None:
        self.store, self.settings = store, settings
        # (destination, delivered, failed) of each settled batch, beside the counters
        # (a child relay tells its parent: fsm.relay_child).
        self.report = report
        self.owner = owner or f"relay:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._pumps: dict[int, tuple[Destination, asyncio.Task[None], Sender]] = {}
        self._session: aiohttp.ClientSession | None = None

    async def run(self) -> None:
        """Deliver until cancelled; then stop every pump (leases of what was in flight
        expire; nothing is lost)."""
        from fsm.destinations.webhook import new_session  # noqa: PLC0415

        self._session = new_session()
        try:
            await register_amqp(self.store, self.settings)
            while True:
                try:
                    # A read, on the read pool: a relay with nothing to do never takes a
                    # place in the writer's transactions.
                    found = await asyncio.to_thread(destinations, self.store)
                    self._follow(found)
                except Exception as exc:  # database away: keep trying, orders are unaffected
                    log.warning("relay: cannot read destinations: %s", exc)
                await asyncio.sleep(REFRESH_SECONDS)
        finally:
            for destination_id in list(self._pumps):
                await self._stop(destination_id)
            await self._session.close()

    def _follow(self, found: list[Destination]) -> None:
        """Start a pump per new destination, stop those removed (or changed)."""
        wanted = {d.id: d for d in found if self._sender(d) is not None or d.id in self._pumps}
        for destination_id, (known, _task, _sender) in list(self._pumps.items()):
            if wanted.get(destination_id) != known:
                asyncio.ensure_future(self._stop(destination_id))
                self._pumps.pop(destination_id, None)
        for destination in found:
            if destination.id in self._pumps:
                continue
            sender = self._sender(destination)
            if sender is None:
                continue
            task = asyncio.create_task(self._pump(destination, sender), name=destination.name)
            self._pumps[destination.id] = (destination, task, sender)

    def _sender(self, destination: Destination) -> Sender | None:
        timeout = self.settings.event_timeout
        if destination.kind == "webhook" and destination.secret and self._session is not None:
            from fsm.destinations.webhook import WebhookSender  # noqa: PLC0415

            return WebhookSender(
                url=destination.url,
                secret=destination.secret,
                session=self._session,
                timeout=timeout,
            )
        if destination.kind == "amqp" and self.settings.amqp_url:
            from fsm.destinations.amqp import AmqpSender  # noqa: PLC0415  (aio-pika on demand)

            return AmqpSender(url=self.settings.amqp_url, timeout=timeout)
        return None  # a destination this relay cannot serve: another relay may

    async def _stop(self, destination_id: int) -> None:
        entry = self._pumps.pop(destination_id, None)
        if entry is None:
            return
        _destination, task, sender = entry
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        await sender.aclose()

    async def _pump(self, destination: Destination, sender: Sender) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        claimed_at = -s.relay_gather
        # A sent batch's outcomes, recorded in the transaction that claims the next batch
        # (one transaction per batch instead of two: on SQLite each one takes the write lock
        # the orders' commits wait for). Its leases stay this relay's until then, so nobody
        # sends those events again meanwhile; the wait is at most `relay_gather`.
        sent: Sent | None = None
        try:
            while True:
                try:
                    # Under a steady trickle, claim at most every `relay_gather` seconds
                    # (unless the last batch was full): events gather into one claim
                    # instead of a transaction for each few.
                    gather = claimed_at + s.relay_gather - loop.time()
                    if gather > 0:
                        await asyncio.sleep(gather)
                    claimed_at = loop.time()
                    now = utcnow()
                    found = None
                    if self.store.dialect.name == "sqlite":
                        # One writer at a time: the backlog is searched on a read connection
                        # (no write lock held meanwhile), then leased if still due.
                        found, dead = await asyncio.to_thread(
                            read,
                            self.store,
                            partial(
                                outbox_sql.due_ids,
                                self.store.dialect,
                                destination_id=destination.id,
                                now=now,
                                limit=s.relay_batch,
                            ),
                        )
                        if not (found or dead or sent):
                            await asyncio.sleep(s.relay_interval)  # nothing to write
                            continue
                    claim = partial(
                        outbox_sql.claim,
                        self.store.dialect,
                        destination_id=destination.id,
                        owner=self.owner,
                        now=now,
                        lease_until=now + timedelta(seconds=s.relay_lease),
                        limit=s.relay_batch,
                        found=found,
                    )
                    claimed = await self.store.committer.submit(
                        partial(self._settle_then, destination, sent, claim)
                    )
                    self._count(destination, sent)
                    sent = None
                    if not claimed:
                        await asyncio.sleep(s.relay_interval)
                        continue
                    attempts = await asyncio.gather(*(sender.send(c) for c in claimed))
                    sent = Sent(list(zip(claimed, attempts, strict=True)), utcnow())
                    if len(claimed) >= s.relay_batch:
                        claimed_at = -s.relay_gather  # a backlog: the next batch at once
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the database away: the leases expire, nothing lost
                    log.warning("relay %s: %s", destination.name, exc)
                    await asyncio.sleep(max(s.relay_interval, 1.0))
        finally:
            if sent is not None:  # stopping: record what was sent (else: sent again later)
                with contextlib.suppress(Exception):
                    await self.store.committer.submit(partial(self._settle, destination, sent))
                    self._count(destination, sent)

    def _count(self, destination: Destination, sent: Sent | None) -> None:
        if sent is None:
            return
        ok = sum(1 for _claimed, attempt in sent.results if attempt.delivered)
        failed = len(sent.results) - ok
        metrics.outbox_delivered(destination.name).inc(ok)
        metrics.outbox_failed(destination.name).inc(failed)
        if self.report is not None:
            self.report(destination.name, ok, failed)

    def _settle_then(
        self,
        destination: Destination,
        sent: Sent | None,
        claim: Callable[[Any], list[Claimed]],
        cursor: Any,
    ) -> list[Claimed]:
        """Record `sent` (if any), then claim the next batch: one transaction."""
        if sent is not None:
            self._settle(destination, sent, cursor)
        return claim(cursor)

    def _settle(self, destination: Destination, sent: Sent, cursor: Any) -> None:
        d, s, now = self.store.dialect, self.settings, sent.at
        results = sent.results
        done = [claimed.event_id for claimed, attempt in results if attempt.delivered]
        outbox_sql.delivered(d, cursor, destination_id=destination.id, event_ids=done, now=now)
        for claimed, attempt in results:
            if attempt.delivered:
                continue
            error = attempt.error or "failed"
            if not attempt.retry or _too_old(claimed.retry_from, now, s.event_max_age):
                log.warning(
                    "event %s to %s dead-lettered: %s", claimed.event_id, destination.name, error
                )
                outbox_sql.dead_letter(
                    d, cursor, destination_id=destination.id, claimed=claimed, error=error
                )
                continue
            delay = backoff(claimed.attempts, base=s.event_backoff_base, cap=s.event_backoff_max)
            outbox_sql.retry_later(
                d,
                cursor,
                destination_id=destination.id,
                event_id=claimed.event_id,
                owner=self.owner,
                at=now + timedelta(seconds=delay),
                error=error,
            )


@dataclass(frozen=True)
class Sent:
    """A batch's attempts, and when they ended (the time recorded with them)."""

    results: list[tuple[Claimed, Attempt]]
    at: datetime


def _too_old(since: datetime, now: datetime, max_age: float) -> bool:
    return (now - since).total_seconds() >= max_age
