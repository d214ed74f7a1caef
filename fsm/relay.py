"""The outbox relay: delivers pending order events to every destination, at least once and
in order per order, and records each delivery. Runs alone as `order-saga relay`, and for
`serve` and `worker` as their child process (fsm.relay_child); any number share the work.

One task (and one connection pool) per destination, so a slow or dead endpoint delays only
its own deliveries; the orders never wait for a relay (their events are committed). A task holds its
destination's cursor (a lease: one relay at a time) and takes the next batch of events
after it (fsm.outbox_sql.take_batch); it sends the subscribed ones, an order's one after
the other in seq order, the orders concurrently; an event of an order with an unfinished
exception row, or behind one of its order's events that just failed, is held, not sent.
The transaction that takes the next batch records the last: the cursor moved past it, and
an exception row for each event not delivered (retry at: exponential backoff with jitter;
dead letter: a refusal, or past `event_max_age` since the event or its redelivery; held).
Exception rows are claimed under leases of their own (fsm.outbox_sql.claim) only while a
destination has any. A relay killed mid-batch (or before recording it) leaves the cursor's
lease to expire: the next relay sends that batch again.
Every database write goes through the store's group-commit thread, after a read on the
read pool said there is work. Decides nothing about orders, and never writes one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from fsm import metrics, outbox, outbox_sql
from fsm.destinations import Attempt, Sender
from fsm.outbox_sql import Claimed, Destination
from fsm.retry import doubling
from fsm.settings import Settings
from fsm.store import Store, utcnow
from fsm.subscriptions import destinations, read
from fsm.text import masked, storable

log = logging.getLogger("order_saga.relay")
AMQP_DESTINATION = "amqp"
# How often the relay re-reads the destination list (a webhook added by the CLI).
REFRESH_SECONDS = 2.0
# PostgreSQL: events after a destination's cursor, none below the horizon for this long
# (a transaction left open anywhere on the server holds them back): the pump looks up who
# holds it (one read of pg_stat_activity, at most this often while it lasts) and warns.
HORIZON_STUCK_SECONDS = 5.0
# The warning again at most this often while the same transaction holds the horizon.
HORIZON_REPEAT_SECONDS = 60.0
# While a destination's deliveries keep failing, its warning again at most this often.
FAILING_REPEAT_SECONDS = 60.0


def backoff(attempts: int, *, base: float, cap: float) -> float:
    """Seconds before attempt `attempts + 1`: doubling from `base`, capped, full jitter
    over its upper half (relays that failed together do not retry together)."""
    ceiling = doubling(base, cap, attempts)
    return random.uniform(ceiling / 2, ceiling)


async def register_amqp(store: Store, settings: Settings) -> None:
    """The RabbitMQ destination, once ORDER_SAGA_AMQP_URL is set: events committed from
    then on are delivered to it (its URL stored with its userinfo masked, `fsm.text.masked`)."""
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
        self._started = 0  # pumps started: each its own lease owner (`_follow`)
        self._stopping: set[asyncio.Task[None]] = set()  # old pumps being stopped
        # Destinations whose row cannot be used as it is (a secret that does not decode):
        # skipped, not a failure of the whole list, which stopped the webhooks after it.
        self._unusable: dict[int, Destination] = {}

    async def run(self) -> None:
        """Deliver until cancelled; then stop every pump (leases of what was in flight
        expire; nothing is lost). Says so in one line when it has read its destinations,
        and in one when it stops; with RabbitMQ configured, tries the broker at once
        (`_check_broker`), not at the first event."""
        registered = started = False
        checking = asyncio.create_task(self._check_broker()) if self.settings.amqp_url else None
        try:
            while True:
                try:
                    if not registered:  # the database away at start: tried again, below
                        await register_amqp(self.store, self.settings)
                        registered = True
                    # A read, on the read pool: a relay with nothing to do never takes a
                    # place in the writer's transactions.
                    found = await asyncio.to_thread(destinations, self.store)
                    self._follow(found)
                    if not started:
                        started = True
                        log.info("relay started: %s", self._serving())
                except Exception as exc:  # database away: keep trying, orders are unaffected
                    what = "read destinations" if registered else "register the amqp destination"
                    log.warning("relay: cannot %s: %s", what, exc)
                await asyncio.sleep(REFRESH_SECONDS)
        finally:
            if checking is not None:
                checking.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await checking
            while self._pumps:
                await self._stop(self._pumps.popitem()[1])
            for stopping in list(self._stopping):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await stopping
            log.info("relay stopped")

    def _serving(self) -> str:
        """The destinations it delivers to, as its log names them: a webhook by its label
        (its URL's path or query may hold a token), RabbitMQ by its URL, password masked."""
        names = [
            f"amqp {masked(self.settings.amqp_url)}"
            if destination.kind == "amqp" and self.settings.amqp_url
            else destination.label
            for destination, _task, _sender in self._pumps.values()
        ]
        listed = (
            f"delivering to {', '.join(names)}"
            if names
            else "no destination yet (`order-saga webhooks add URL`, or ORDER_SAGA_AMQP_URL)"
        )
        return f"{listed}; the destination list is read again every {REFRESH_SECONDS:g} s"

    async def _check_broker(self) -> None:
        """Connect to RabbitMQ and declare the exchange once, at start: a wrong URL or
        password is a warning now, on an idle database too, not at the first order. The
        pump retries as before whatever this finds."""
        from fsm.destinations.amqp import AmqpSender  # noqa: PLC0415  (aio-pika on demand)

        assert self.settings.amqp_url is not None
        sender = AmqpSender(url=self.settings.amqp_url, timeout=self.settings.event_timeout)
        try:
            attempt = await sender.check()
        finally:
            await sender.aclose()
        where = masked(self.settings.amqp_url)
        if attempt.delivered:
            log.debug("relay: RabbitMQ at %s reached", where)
            return
        log.warning(
            "relay: cannot reach RabbitMQ at %s (events to it wait; the relay keeps trying): %s",
            where,
            storable(attempt.error or "failed"),
            extra={"destination": AMQP_DESTINATION, "event": "broker_unreachable"},
        )

    def _follow(self, found: list[Destination]) -> None:
        """Start a pump per new destination, stop those removed (or changed: its old pump,
        with the old url and subscription, is stopped, the new one started)."""
        wanted = {d.id: d for d in found if self._serves(d) or d.id in self._pumps}
        for destination_id, entry in list(self._pumps.items()):
            if wanted.get(destination_id) != entry[0]:
                del self._pumps[destination_id]
                stopping = asyncio.ensure_future(self._stop(entry))  # that pump, not the id's next
                self._stopping.add(stopping)
                stopping.add_done_callback(self._stopping.discard)
        for destination in found:
            if destination.id in self._pumps or self._unusable.get(destination.id) == destination:
                continue
            try:
                sender = self._sender(destination)
            except ValueError as exc:  # a secret that does not decode (edited by hand, cut)
                self._unusable[destination.id] = destination  # said once, until it changes
                log.warning(
                    "relay: cannot deliver to %s: its signing secret is unreadable (%s); its"
                    " events wait. `order-saga webhooks rotate %s --overlap 0` gives it a new one",
                    destination.label,
                    storable(str(exc) or type(exc).__name__),
                    destination.id,
                    extra={"destination": destination.label, "event": "secret_unreadable"},
                )
                continue
            if sender is None:
                continue
            self._started += 1
            # Its own lease owner: a stopping pump (still recording its last batch) and
            # its successor never hold the cursor's lease, or a claim, as one.
            owner = f"{self.owner}:{destination.id}:{self._started}"
            task = asyncio.create_task(
                self._start_pump(destination, sender, owner), name=destination.label
            )
            self._pumps[destination.id] = (destination, task, sender)

    def _serves(self, destination: Destination) -> bool:
        """Whether this relay can deliver there (else another relay may)."""
        if destination.kind == "webhook":
            return bool(destination.secret)
        return destination.kind == "amqp" and bool(self.settings.amqp_url)

    def _sender(self, destination: Destination) -> Sender | None:
        timeout = self.settings.event_timeout
        if destination.kind == "webhook" and destination.secret:
            from fsm.destinations.webhook import WebhookSender, destination_keys  # noqa: PLC0415

            return WebhookSender(
                url=destination.url,
                keys=destination_keys(destination),
                timeout=timeout,
                # What `_send` can have in flight to it: a batch's events (an order's one
                # at a time) and as many claimed retries, side by side.
                connections=2 * self.settings.relay_batch,
            )
        if destination.kind == "amqp" and self.settings.amqp_url:
            from fsm.destinations.amqp import AmqpSender  # noqa: PLC0415  (aio-pika on demand)

            return AmqpSender(url=self.settings.amqp_url, timeout=timeout)
        return None  # a destination this relay cannot serve: another relay may

    async def _stop(self, entry: tuple[Destination, asyncio.Task[None], Sender]) -> None:
        _destination, task, sender = entry
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        await sender.aclose()

    async def _start_pump(self, destination: Destination, sender: Sender, owner: str) -> None:
        """`_pump`, once what waits out a backoff there is due (`_hurry`): the relay that
        set those backoffs may have stopped while the destination was failing, and nothing
        tells this one it delivers again but its own first success."""
        with contextlib.suppress(Exception):  # the database away: the pump says so, retries
            await self._hurry(destination, started=True)
        await self._pump(destination, sender, owner)

    async def _hurry(self, destination: Destination, *, started: bool = False) -> None:
        """The destination's pending deliveries waiting out a backoff due now, in one UPDATE:
        it delivers again after failing (`FailureWatch.see`), or its pump starts (a read
        first: a relay with nothing waiting writes nothing). An event that failed while the
        destination was down must not wait minutes more while newer ones flow (its order's
        later events held behind it, the lag growing); order per order still holds."""
        d, now = self.store.dialect, utcnow()
        ask = partial(outbox_sql.waiting, d, destination_id=destination.id, now=now)
        if started and not await asyncio.to_thread(read, self.store, ask):
            return
        made = await self.store.committer.submit(
            partial(outbox_sql.hurry, d, destination_id=destination.id, now=now)
        )
        log.debug(
            "relay %s: %d deliveries due now, not after their backoff", destination.label, made
        )

    async def _pump(self, destination: Destination, sender: Sender, owner: str) -> None:
        s, d = self.settings, self.store.dialect
        loop = asyncio.get_running_loop()
        claimed_at = -s.relay_gather
        # A sent batch's outcomes, recorded in the transaction that takes the next batch
        # (one transaction per batch: on SQLite each one takes the write lock the orders'
        # commits wait for). The cursor's lease stays this relay's until then, so nobody
        # sends those events again meanwhile; the wait is at most `relay_gather`.
        sent: Sent | None = None
        watch = _HorizonWatch(self.store, destination.label, loop.time)
        failing = FailureWatch(destination.label, loop.time)
        try:
            while True:
                try:
                    # Under a steady trickle, take at most every `relay_gather` seconds
                    # (unless the last batch was full): events gather into one batch
                    # instead of a transaction for each few.
                    gather = claimed_at + s.relay_gather - loop.time()
                    if gather > 0:
                        await asyncio.sleep(gather)
                    claimed_at = loop.time()
                    now = utcnow()
                    # A read first, on the read pool (no write lock held meanwhile): an
                    # idle relay writes nothing.
                    work = await asyncio.to_thread(
                        read,
                        self.store,
                        partial(
                            outbox_sql.work,
                            d,
                            destination_id=destination.id,
                            owner=owner,
                            now=now,
                            limit=s.relay_batch,
                        ),
                    )
                    await watch.see(work.behind_horizon)
                    if not (work.stream or work.due or work.dead or sent):
                        await asyncio.sleep(s.relay_interval)  # nothing to write
                        continue
                    batch, claimed = await self.store.committer.submit(
                        partial(self._settle_then, destination, owner, sent, work, now)
                    )
                    self._count(destination, sent)
                    sent = None
                    events = batch.events if batch is not None else []
                    if not (events or claimed):
                        await asyncio.sleep(s.relay_interval)
                        continue
                    sent = await self._send(destination, sender, batch, claimed)
                    if failing.see(sent.tried):
                        await self._hurry(destination)  # delivering again: nothing waits
                    if len(events) >= s.relay_batch or len(claimed) >= s.relay_batch:
                        claimed_at = -s.relay_gather  # a backlog: the next batch at once
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the database away: the leases expire, nothing lost
                    log.warning("relay %s: %s", destination.label, exc)
                    await asyncio.sleep(max(s.relay_interval, 1.0))
        finally:
            # Stopping: record what was sent (else: sent again later), let the cursor go.
            with contextlib.suppress(Exception):
                await self.store.committer.submit(
                    partial(self._stop_pump, destination, owner, sent)
                )
                self._count(destination, sent)

    async def _send(
        self,
        destination: Destination,
        sender: Sender,
        batch: outbox_sql.Batch | None,
        claimed: list[Claimed],
    ) -> Sent:
        """The batch's subscribed events (an order's in seq order, one after the other;
        orders side by side; an order held, or behind one of its events that failed, is
        not sent) and the claimed exception rows, all concurrently."""
        runs: dict[uuid.UUID, list[Claimed]] = {}
        for event in batch.events if batch is not None else []:
            if outbox.wants(destination.events, event.type):
                runs.setdefault(event.order_id, []).append(event)
        held = batch.held if batch is not None else {}
        outcomes: dict[str, Attempt | None] = {}  # None: held, not sent

        # The cursor's lease is taken once per batch: no send starts once a third of it
        # has passed (an order's slow events go one after the other; each send ends
        # within `event_timeout`), or another relay would take the cursor and send the
        # batch again meanwhile. What was not reached stays after the cursor (`_reached`).
        loop = asyncio.get_running_loop()
        stop_at = loop.time() + self.settings.relay_lease / 3

        async def in_order(events: list[Claimed]) -> None:
            blocked = events[0].order_id in held
            for event in sorted(events, key=lambda e: e.seq):
                if not blocked and loop.time() > stop_at:
                    return
                attempt = None if blocked else await sender.send(event)
                blocked = blocked or not (attempt and attempt.delivered)
                outcomes[event.event_id] = attempt

        await asyncio.gather(
            asyncio.gather(*(in_order(events) for events in runs.values())),
            claims := asyncio.gather(*(sender.send(c) for c in claimed)),
        )
        attempts = await claims
        reached = _reached(destination, batch, outcomes)
        return Sent(
            list(zip(claimed, attempts, strict=True)),
            utcnow(),
            batch=reached,
            stream=[
                (e, outcomes[e.event_id])
                for e in (reached.events if reached is not None else [])
                if e.event_id in outcomes
            ],
        )

    def _count(self, destination: Destination, sent: Sent | None) -> None:
        if sent is None:
            return
        tried = sent.tried
        ok = sum(1 for attempt in tried if attempt.delivered)
        failed = len(tried) - ok
        metrics.outbox_delivered(destination.label).inc(ok)
        metrics.outbox_failed(destination.label).inc(failed)
        if self.report is not None:
            self.report(destination.label, ok, failed)

    def _settle_then(
        self,
        destination: Destination,
        owner: str,
        sent: Sent | None,
        work: outbox_sql.Work,
        now: datetime,
        cursor: Any,
    ) -> tuple[outbox_sql.Batch | None, list[Claimed]]:
        """Record `sent` (if any), then take the next batch of the stream (when there may
        be one and this relay can have the cursor) and claim the due exception rows: one
        transaction."""
        d, s = self.store.dialect, self.settings
        lease_until = now + timedelta(seconds=s.relay_lease)
        at = (
            self._settle(destination, owner, sent, cursor, lease_until)
            if sent is not None
            else None
        )
        batch = None
        if work.stream or at is not None:
            batch = outbox_sql.take_batch(
                d,
                cursor,
                destination_id=destination.id,
                owner=owner,
                now=now,
                lease_until=lease_until,
                limit=s.relay_batch,
                at=at,
            )
            if batch is not None and not batch.events:  # at the end: let the cursor go
                outbox_sql.release_stream(d, cursor, destination_id=destination.id, owner=owner)
        claimed: list[Claimed] = []
        if work.due or work.dead:
            claimed = outbox_sql.claim(
                d,
                cursor,
                destination_id=destination.id,
                owner=owner,
                now=now,
                lease_until=lease_until,
                limit=s.relay_batch,
                # SQLite: the due ones as the read found them (the search held no write
                # lock); PostgreSQL: searched again with SKIP LOCKED (relays share them).
                found=work.due if d.name == "sqlite" else None,
            )
        return batch, claimed

    def _stop_pump(
        self, destination: Destination, owner: str, sent: Sent | None, cursor: Any
    ) -> None:
        if sent is not None:
            self._settle(destination, owner, sent, cursor, None)
        d = self.store.dialect
        outbox_sql.release_stream(d, cursor, destination_id=destination.id, owner=owner)

    def _settle(
        self,
        destination: Destination,
        owner: str,
        sent: Sent,
        cursor: Any,
        lease_until: datetime | None,
    ) -> tuple[int, int] | None:
        """Record a sent batch: the cursor past the stream's part (if this relay still holds
        it; its lease renewed to `lease_until`), exception rows for what was not delivered,
        the claimed exception rows' outcomes. Returns where the cursor now is (None: the
        stream had no part, or another relay took the cursor and sends it again)."""
        d = self.store.dialect
        at = None
        if sent.batch is not None and sent.batch.events:
            if outbox_sql.advance(
                d,
                cursor,
                destination_id=destination.id,
                owner=owner,
                batch=sent.batch,
                lease_until=lease_until,
            ):
                at = sent.batch.last
                outbox_sql.set_aside(
                    d, cursor, destination_id=destination.id, rows=self._aside(destination, sent)
                )
            else:
                log.warning(
                    "relay %s: the cursor was taken over or moved back (a commit lost with the "
                    "database server); its batch is sent again",
                    destination.label,
                )
        self._settle_claims(destination, owner, sent, cursor)
        return at

    def _settle_claims(self, destination: Destination, owner: str, sent: Sent, cursor: Any) -> None:
        """The claimed exception rows' outcomes: delivered, retried later, or dead."""
        d, now = self.store.dialect, sent.at
        done = [claimed.event_id for claimed, attempt in sent.results if attempt.delivered]
        outbox_sql.delivered(d, cursor, destination_id=destination.id, event_ids=done, now=now)
        for claimed, attempt in sent.results:
            if attempt.delivered:
                continue
            state, next_at, error = self._verdict(claimed, attempt, now, claimed.attempts)
            if state == "dead":
                # Not this relay's claim any more (its lease ran out mid-send; another
                # relay may have delivered it since): nothing is recorded.
                if outbox_sql.dead_letter(
                    d,
                    cursor,
                    destination_id=destination.id,
                    claimed=claimed,
                    owner=owner,
                    error=error,
                ):
                    _dead_lettered(destination, claimed, error)
                continue
            outbox_sql.retry_later(
                d,
                cursor,
                destination_id=destination.id,
                event_id=claimed.event_id,
                owner=owner,
                at=next_at,
                error=error,
            )

    def _verdict(
        self, claimed: Claimed, attempt: Attempt, now: datetime, attempts: int
    ) -> tuple[str, datetime, str]:
        """A failed attempt's outcome, after `attempts` attempts: (state, next attempt at,
        error). "dead" (at `now`): a refusal, or past `event_max_age` since the event or
        its redelivery; else "pending", retried after a backoff."""
        error = attempt.error or "failed"
        if self._dead(claimed, attempt, now):
            return "dead", now, error
        s = self.settings
        delay = backoff(attempts, base=s.event_backoff_base, cap=s.event_backoff_max)
        return "pending", now + timedelta(seconds=delay), error

    def _dead(self, claimed: Claimed, attempt: Attempt, now: datetime) -> bool:
        return not attempt.retry or _too_old(claimed.retry_from, now, self.settings.event_max_age)

    def _aside(self, destination: Destination, sent: Sent) -> list[outbox_sql.Aside]:
        """The exception rows of the stream's part: each failed event (retried later, or
        dead), and each event not sent behind one of its order: pending, or dead behind
        one dead-lettered in this batch. Held (an exception row of its order when the
        batch was taken): pending, whatever that row's state was then (an operator may
        have redelivered it since); the claim's sweep marks it dead if a dead letter
        still precedes it."""
        now = sent.at
        behind: dict[uuid.UUID, str] = {}
        rows = []
        for event, attempt in sent.stream:
            if attempt is not None and attempt.delivered:
                continue
            if attempt is None:
                state = behind.get(event.order_id, "pending")
                error = "behind a dead letter" if state == "dead" else None
                rows.append(outbox_sql.Aside(event, state, 0, now, error))
                continue
            state, next_at, error = self._verdict(event, attempt, now, 1)
            if state == "dead":
                _dead_lettered(destination, event, error)
            behind[event.order_id] = state
            rows.append(outbox_sql.Aside(event, state, 1, next_at, error))
        return rows


class FailureWatch:
    """A pump's deliveries as the log tells them: a warning when they start failing (how
    many of the batch's attempts, the last error), again at most every
    FAILING_REPEAT_SECONDS while they keep failing (how many since the last one), and an
    info line once a batch is all delivered again; never one line per event (`events
    list` lists each). The error is the one stored and listed: a webhook's never names its
    URL (whose path or query may hold a token), and any URL's userinfo is masked.
    `see` answers True when deliveries succeed again (the pump then makes what waits out a
    backoff due now: `Relay._hurry`), at most once every `repeat` seconds: an endpoint that
    fails one event again and again, the others going through, must not have that one
    retried after every batch."""

    def __init__(
        self, name: str, clock: Callable[[], float], repeat: float = FAILING_REPEAT_SECONDS
    ) -> None:
        self.name, self.clock, self.repeat = name, clock, repeat
        self.since: float | None = None  # failing since
        self.warned = 0.0  # when it last said so
        self.failed = 0  # failed attempts since that line
        self.refused = 0  # of those, refused for good (dead-lettered at once, not retried)
        self.total = 0  # since failing began
        self.recovered: float | None = None  # when `see` last answered True

    def see(self, tried: Sequence[Attempt]) -> bool:
        failed = [a for a in tried if not a.delivered]
        now = self.clock()
        if not failed:
            if tried and self.since is not None:
                log.info(
                    "relay %s: deliveries succeed again after %.0f s (%d failed attempts)",
                    self.name,
                    now - self.since,
                    self.total,
                    extra={"destination": self.name, "event": "deliveries_recovered"},
                )
                self.since = None
                self.failed = self.refused = self.total = 0
                if self.recovered is None or now - self.recovered >= self.repeat:
                    self.recovered = now
                    return True
            return False
        self.failed += len(failed)
        self.refused += sum(1 for a in failed if not a.retry)
        self.total += len(failed)
        error = storable(failed[-1].error or "failed")  # its URLs' userinfo masked
        if self.since is None:
            self.since = now
            what = f"deliveries failing: {len(failed)} of {len(tried)} attempts failed"
        elif now - self.warned >= self.repeat:
            what = (
                f"deliveries still failing after {now - self.since:.0f} s: "
                f"{self.failed} attempts failed since the last warning"
            )
        else:
            return False
        log.warning(
            "relay %s: %s, last error: %s (%s)",
            self.name,
            what,
            error,
            self._outcome(),
            extra={"destination": self.name, "event": "deliveries_failing", "error": error},
        )
        self.warned = now
        self.failed = self.refused = 0
        return False

    def _outcome(self) -> str:
        """What becomes of the failed attempts the line counts: retried, or (a 4xx answer
        but 408/425/429) dead-lettered at once."""
        if not self.refused:
            return "retried with backoff; `order-saga events list` lists each delivery"
        if self.refused == self.failed:
            return (
                "refused: dead-lettered, not retried; `order-saga events list --failed` "
                "lists them, `order-saga events redeliver` sends them again"
            )
        return (
            f"{self.refused} refused and dead-lettered, the others retried with backoff; "
            "`order-saga events list --failed` lists the dead letters"
        )


class _HorizonWatch:
    """A pump's view of the PostgreSQL horizon: when its events have waited behind it for
    `HORIZON_STUCK_SECONDS`, one warning naming the transaction that holds it (again when
    another one does, or every `HORIZON_REPEAT_SECONDS`), and an info line once it clears.
    Off the hot path: it reads nothing unless the pump's own read found events waiting."""

    def __init__(self, store: Store, name: str, clock: Callable[[], float]) -> None:
        self.store, self.name, self.clock = store, name, clock
        self.since: float | None = None  # waiting since
        self.checked = 0.0
        self.warned: tuple[float, int] | None = None  # when, and the horizon then

    async def see(self, behind: bool) -> None:
        now = self.clock()
        if not behind:
            if self.warned is not None:
                log.info(
                    "relay %s: the PostgreSQL horizon moved on after %.0f s; deliveries resume",
                    self.name,
                    now - (self.since or now),
                )
            self.since = self.warned = None
            return
        if self.since is None:
            self.since = now
        if now - self.since < HORIZON_STUCK_SECONDS or now - self.checked < HORIZON_STUCK_SECONDS:
            return
        self.checked = now
        d = self.store.dialect
        try:
            holder = await asyncio.to_thread(
                read, self.store, partial(outbox_sql.horizon_holder, d)
            )
        except Exception as exc:  # pg_stat_activity unreadable: say what is known
            log.warning("relay %s: cannot look up the horizon's holder: %s", self.name, exc)
            return
        if self.warned is not None and (
            self.warned[1] == holder.xid and now - self.warned[0] < HORIZON_REPEAT_SECONDS
        ):
            return
        self.warned = (now, holder.xid)
        waited = now - self.since
        if holder.pid is None:
            log.warning(
                "relay %s: events have waited %.0f s behind the PostgreSQL horizon (xid %s): "
                "a transaction still open holds every destination's deliveries back, but no "
                "session visible to this role holds it (another role's session, or a prepared "
                "transaction: see pg_prepared_xacts, or look in pg_stat_activity as a superuser)",
                self.name,
                waited,
                holder.xid,
            )
            return
        log.warning(
            "relay %s: events have waited %.0f s behind the PostgreSQL horizon (xid %s), held "
            "by %s pid %s (database %s, user %s, application %r, state %s), its transaction "
            "open for %s s: every destination's deliveries wait until it ends%s",
            self.name,
            waited,
            holder.xid,
            "the transaction of" if holder.by_xid else "a snapshot of",
            holder.pid,
            holder.database,
            holder.user,
            holder.application,
            holder.state,
            "?" if holder.open_seconds is None else f"{holder.open_seconds:.0f}",
            " (its state and age are hidden from this role: another role's session; "
            "pg_read_all_stats or a superuser sees them)"
            if holder.state is None
            else "",
        )


@dataclass(frozen=True)
class Sent:
    """A batch's attempts, and when they ended (the time recorded with them): the claimed
    exception rows' (`results`), and the stream's (`stream`: None for an event held)."""

    results: list[tuple[Claimed, Attempt]]
    at: datetime
    batch: outbox_sql.Batch | None = None
    stream: list[tuple[Claimed, Attempt | None]] = field(default_factory=list)

    @property
    def tried(self) -> list[Attempt]:
        """Every attempt made (the claimed rows' and the stream's; not the events held)."""
        return [a for _c, a in [*self.results, *self.stream] if a is not None]


def _reached(
    destination: Destination,
    batch: outbox_sql.Batch | None,
    outcomes: dict[str, Attempt | None],
) -> outbox_sql.Batch | None:
    """The batch up to (not including) its first subscribed event neither sent nor held,
    in stream order: the cursor advances that far; the rest is taken again."""
    if batch is None:
        return None
    for i, event in enumerate(batch.events):
        if outbox.wants(destination.events, event.type) and event.event_id not in outcomes:
            return outbox_sql.Batch(batch.events[:i], batch.held, batch.start)
    return batch


def _dead_lettered(destination: Destination, event: Claimed, error: str) -> None:
    log.warning("event %s to %s dead-lettered: %s", event.event_id, destination.label, error)


def _too_old(since: datetime, now: datetime, max_age: float) -> bool:
    return (now - since).total_seconds() >= max_age
