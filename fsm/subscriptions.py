"""The operator's side of order events: webhooks added (a signing secret made once),
listed, removed, rotated (a new secret, the webhook kept) and tested; each destination's
backlog (for /metrics, /healthz and the console); dead letters listed and redelivered.
Writes go through the store's commit thread, reads through its read pool. Sends nothing
except `test_webhook` (one signed request, now).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any, NamedTuple, TypeVar
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import yarl

from fsm import keys, outbox, outbox_sql
from fsm.bounds import MAX_ID
from fsm.destinations import Attempt
from fsm.destinations.webhook import (
    current_secret,
    destination_keys,
    fingerprint,
    new_secret,
    post,
)
from fsm.outbox_sql import Backlog, DeliveryRow, Destination
from fsm.settings import Settings
from fsm.sql import Dialect
from fsm.store import Store, utcnow

T = TypeVar("T")
log = logging.getLogger("order_saga.events")


def read(store: Store, op: Callable[[Any], T]) -> T:
    """Run a read-only cursor op on a pooled connection of the read engine."""
    conn = store.engine.raw_connection()
    try:
        return op(conn.cursor())
    finally:
        conn.close()  # back to the pool, rolled back


# A webhook's URL is its destination's name (event_destinations.name: VARCHAR(200)).
MAX_URL = 200
# An event's seq: an INTEGER column (PostgreSQL: 4 bytes).
MAX_SEQ = MAX_ID


def webhook_url(url: str) -> str:
    """A URL events can be POSTed to, normalised (`normal_url`); ValueError saying why not.
    The host: a name that encodes to letters, digits, `.`, `-` and `_` (Docker Compose
    service names), or an IP literal; what aiohttp would refuse at every attempt is refused
    here, once."""
    _usable(url)
    normal = normal_url(url)
    if len(normal) > MAX_URL:
        raise ValueError(
            f"a webhook URL must be at most {MAX_URL} characters (this one: {len(normal)})"
        )
    return normal


_DEFAULT_PORTS = {"http": 80, "https": 443}


def normal_url(url: str) -> str:
    """The form a webhook's URL is stored in, so that one endpoint is subscribed once: the
    scheme and host lower-case, the scheme's default port dropped, an empty path made `/`,
    an empty query (`?`) and any fragment dropped (a fragment is never sent). Its path and
    query are kept as given (percent-escapes, dot segments and a trailing slash included:
    they are what the endpoint receives); `same_endpoint` also takes a trailing slash alike."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    port = parts.port
    netloc = host if port in (None, _DEFAULT_PORTS.get(parts.scheme)) else f"{host}:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))


def endpoint_key(url: str) -> str:
    """What two URLs of one subscription share: `normal_url` with the path's trailing
    slashes dropped (`/hook` and `/hook/`: one endpoint, or at least one consumer; sending
    it each event twice, under two secrets, is never what was meant). A URL stored before
    these checks that no longer parses: itself."""
    try:
        parts = urlsplit(normal_url(url))
    except ValueError:
        return url
    return urlunsplit(parts._replace(path=parts.path.rstrip("/")))


def _usable(url: str) -> None:
    if len(url) > MAX_URL:
        raise ValueError(
            f"a webhook URL must be at most {MAX_URL} characters (this one: {len(url)})"
        )
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http:// or https:// URL")
    if not _usable_host(parts.hostname):
        raise ValueError(f"{url!r}: {parts.hostname!r} is not a valid host name")
    try:
        port = parts.port  # raises when out of range or not a number
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError(f"{url!r}: the port is not a number from 1 to 65535")
    if parts.username or parts.password:
        raise ValueError("a webhook URL must not carry credentials (the signature authenticates)")
    try:
        yarl.URL(url)  # as aiohttp reads it: IDNA 2008 refuses what IDNA 2003 drops (U+200B)
    except ValueError as exc:
        raise ValueError(f"{url!r} is not a URL a request can go to: {exc}") from None


_HOST_NAME = re.compile(r"[a-z0-9_.-]+")  # urlsplit lower-cases the host


def _usable_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    try:
        # Catches an empty label (a..b), one over 63 characters.
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        return False
    return _HOST_NAME.fullmatch(ascii_host) is not None


@dataclass(frozen=True)
class Added:
    destination: Destination
    secret: str  # shown once: only its holder can verify the signatures


def add_webhook(store: Store, url: str, types: tuple[str, ...]) -> Added:
    """Subscribe `url` (stored normalised: `webhook_url`) to `types`; ValueError when it,
    or a URL of the same endpoint (`endpoint_key`), is subscribed already."""
    secret = new_secret()
    normal = webhook_url(url)
    added = store.committer.call(
        partial(
            _add_once,
            store.dialect,
            url=normal,
            secret=secret,
            events=outbox.subscription(types),
            now=utcnow(),
        )
    )
    if isinstance(added, str):
        written = "" if added == normal else f", as {added}"
        raise ValueError(f"{normal} is subscribed already{written} (remove it first)")
    return Added(added, secret)


def _add_once(
    d: Dialect, cursor: Any, *, url: str, secret: str, events: str, now: datetime
) -> Destination | str:
    """In the writer's transaction: the webhook added, or the URL of the one that has its
    endpoint already. PostgreSQL: the table locked against other writers first (readers
    go on), so two `webhooks add` of one endpoint at once cannot both find it absent
    (SQLite's write lock does that there)."""
    if d.name == "postgresql":
        cursor.execute("LOCK TABLE event_destinations IN SHARE ROW EXCLUSIVE MODE")
    key = endpoint_key(url)
    for destination in outbox_sql.destinations(d, cursor):
        if destination.kind == "webhook" and endpoint_key(destination.url) == key:
            return destination.url
    added = outbox_sql.add_destination(
        d, cursor, name=url, kind="webhook", url=url, secret=secret, events=events, now=now
    )
    return url if added is None else added


def embedded_sink(store: Store, settings: Settings, url: str) -> str | None:
    """Why `url` will refuse every event, if it is this deployment's own embedded reference
    sink (`serve`'s /services/sink) while authentication is on: the embedded services sit
    behind the token like every route but /healthz and /metrics, and the relay sends no
    Authorization. One line, for `webhooks add` and `webhooks test`; None otherwise."""
    if not settings.embedded_services:
        return None
    if urlsplit(endpoint_key(url)).path != "/services/sink":
        return None
    on = settings.api_token is not None or settings.oidc or keys.any_keys(engine=store.engine)
    if not on:
        return None
    return (
        "this looks like this deployment's embedded sink (/services/sink), which takes the "
        "API token like every route once authentication is on; the relay sends none, so "
        "each event gets HTTP 401 and is dead-lettered: run `order-saga services` (its own "
        "process, no token) and subscribe its /sink instead (README, Order events)"
    )


def destinations(store: Store) -> list[Destination]:
    return read(store, partial(outbox_sql.destinations, store.dialect))


def find(store: Store, ident: str, *, kind: str | None = "webhook") -> Destination:
    """A destination by id or by URL; LookupError when none matches."""
    found = [d for d in destinations(store) if kind is None or d.kind == kind]
    for destination in found:
        if ident in (str(destination.id), destination.url, destination.name):
            return destination
    if "://" in ident:  # a webhook's URL written another way (HTTP://, :80, /hook/)
        key = endpoint_key(ident)
        for destination in found:
            if destination.kind == "webhook" and endpoint_key(destination.url) == key:
                return destination
    raise LookupError(f"no {kind or 'destination'} {ident!r} (see `order-saga webhooks list`)")


class Removed(NamedTuple):
    destination: Destination
    pending: int  # undelivered events dropped with it, dead letters aside
    dead: int  # its dead letters, dropped too


def remove(store: Store, ident: str) -> Removed:
    """Unsubscribe a webhook, or the RabbitMQ destination (`amqp`: a relay started with
    ORDER_SAGA_AMQP_URL adds it again); its undelivered events are dropped with it, and
    counted in the same transaction."""
    destination = find(store, ident, kind=None)
    pending, dead = store.committer.call(
        partial(_remove_counting, store.dialect, destination_id=destination.id)
    )
    return Removed(destination, pending, dead)


def _remove_counting(d: Dialect, cursor: Any, *, destination_id: int) -> tuple[int, int]:
    dropped = [b for b in outbox_sql.backlog(d, cursor) if b.destination.id == destination_id]
    outbox_sql.remove_destination(d, cursor, destination_id=destination_id)
    return (dropped[0].pending, dropped[0].dead) if dropped else (0, 0)


@dataclass(frozen=True)
class Rotated:
    destination: Destination
    secret: str  # the new one, shown once
    old_until: datetime | None  # until when the old one signs beside it (None: not at all)


def rotate(store: Store, ident: str, *, overlap: float) -> Rotated:
    """A webhook's signing secret replaced, its id, cursor and undelivered events kept
    (remove + add would drop them). For `overlap` seconds (0: none) the old secret signs
    beside the new one (two signatures, Standard Webhooks), so the consumer can switch at
    any time within it; LookupError when no such webhook. `secret` gets the new one alone,
    the old one and its end their own columns: a relay of an earlier release reads `secret`
    as one secret (and signs with the new one only)."""
    destination = find(store, ident)
    secret = new_secret()
    # Whole seconds: what `webhooks rotate` says, and what the end is compared with
    # (a request's timestamp).
    now = utcnow().replace(microsecond=0)
    until = now + timedelta(seconds=overlap) if overlap > 0 else None
    op = partial(_rotate, store.dialect, destination_id=destination.id, secret=secret, until=until)
    if not store.committer.call(op):
        raise LookupError(f"no webhook {ident!r} (removed meanwhile)")
    return Rotated(destination, secret, until)


def _rotate(
    d: Dialect, cursor: Any, *, destination_id: int, secret: str, until: datetime | None
) -> bool:
    """Only the current secret is kept as the previous one: a rotation during an overlap
    ends the earlier overlap."""
    stored = outbox_sql.webhook_secret(d, cursor, destination_id=destination_id)
    if stored is None:
        return False
    previous = None if until is None else current_secret(stored)
    return outbox_sql.set_secret(
        d,
        cursor,
        destination_id=destination_id,
        secret=secret,
        previous=previous,
        until=until,
        previous_for=None if previous is None else fingerprint(secret),
    )


def test_event(destination: Destination) -> tuple[str, bytes]:
    """A signed `order-saga.test` CloudEvent (no order: data names the destination)."""
    msg_id = f"test:{uuid.uuid4()}"
    body = {
        "specversion": "1.0",
        "id": msg_id,
        "source": "/order-saga",
        "type": "order-saga.test",
        "time": utcnow().isoformat().replace("+00:00", "Z"),
        "datacontenttype": "application/json",
        "data": {"destination": destination.id, "url": destination.url},
    }
    return msg_id, json.dumps(body, separators=(",", ":")).encode()


async def test_webhook(destination: Destination, *, timeout: float) -> Attempt:
    """Send one test event now, outside the outbox, signed as the relay signs: the
    endpoint's answer."""
    keys = destination_keys(destination)
    msg_id, body = test_event(destination)
    async with aiohttp.ClientSession() as session:
        return await post(session, destination.url, keys, msg_id, body, timeout)


def backlog(store: Store) -> list[Backlog]:
    return read(store, partial(outbox_sql.backlog, store.dialect))


class Lag(NamedTuple):
    """A destination's backlog as /metrics and /healthz show it."""

    pending: int  # undelivered events, dead letters excluded
    seconds: float  # since the oldest of them (0: none)
    dead: int  # dead letters: refused or expired, each holding its order's later events


def lags(store: Store) -> dict[str, Lag]:
    """destination (its `label`: a webhook's URL may hold a token, and /healthz and /metrics
    are public) -> its `Lag`. A dead letter is in `dead`, not in `pending` or `seconds`:
    it waits for an operator (`events redeliver`), not for the relay."""
    now = utcnow()
    return {
        b.destination.label: Lag(
            b.pending,
            (now - b.oldest_pending).total_seconds() if b.oldest_pending else 0.0,
            b.dead,
        )
        for b in backlog(store)
    }


def lags_if_known(store: Store) -> dict[str, Lag]:
    """`lags`, or nothing when the database cannot say (down, or not migrated yet): for
    /healthz and /metrics, which report the database's state elsewhere."""
    try:
        return lags(store)
    except Exception as exc:  # the driver's error, whichever driver
        log.debug("event backlog unknown: %s", exc)
        return {}


def deliveries(
    store: Store, *, failed: bool = False, limit: int = 50, order_id: uuid.UUID | None = None
) -> list[DeliveryRow]:
    op = partial(
        outbox_sql.deliveries,
        store.dialect,
        state="dead" if failed else None,
        limit=limit,
        order_id=order_id,
    )
    return read(store, op)


@dataclass(frozen=True)
class Revived:
    count: int  # deliveries back in line
    # One event asked for: its order's earliest event revived, which goes first. Not the
    # one asked for when an earlier event of the order was dead on the same destination.
    first: str | None = None

    def said(self, asked: str | None) -> str:
        """`N deliveries back in line`, naming the earlier event that goes first."""
        plural = "y" if self.count == 1 else "ies"
        told = f"{self.count} deliver{plural} back in line"
        if asked is not None and self.first not in (None, asked):
            told += f": {self.first} first (an earlier dead letter of its order)"
        return told


def redeliver(store: Store, event_id: str | None) -> Revived:
    """Dead letters back in line (one event with its order's other dead events on the
    destinations where it is dead, the earliest first; or all); ValueError for a malformed
    id."""
    order_id = None
    if event_id is not None:
        order_id, seq = outbox_sql.split_id(event_id)
        if not 0 <= seq <= MAX_SEQ:  # a column holds no more (SQLite: OverflowError)
            raise ValueError(f"{event_id!r} is not an event id (its seq is out of range)")
    op = partial(outbox_sql.redeliver, store.dialect, event_id=event_id, now=utcnow())
    count, lowest = store.committer.call(op)
    if order_id is None or lowest is None:
        return Revived(count)
    return Revived(count, outbox.event_id(order_id, lowest))


async def redeliver_async(store: Store, event_id: str | None) -> Revived:
    return await asyncio.to_thread(redeliver, store, event_id)
