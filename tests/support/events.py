"""Order events in tests: the outbox read back, a webhook subscribed to the reference sink,
a relay run in the background, condition waits, and the per-order ordering check."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from downstream.seed import MISSING_PRODUCT_ID, ORDINARY_USER_ID, POOR_USER_ID, WIDGET_ID
from fsm import outbox, outbox_sql, subscriptions
from fsm.executor import Executor
from fsm.relay import Relay
from fsm.settings import Settings
from fsm.store import Store
from tests.support.endpoint import Endpoint, Request
from tests.support.services import HTTP
from tests.support.waiting import wait_until_async

# Deliveries fast enough for tests, every branch still reachable.
FAST_EVENTS = {
    "relay_interval": 0.02,
    "event_backoff_base": 0.02,
    "event_backoff_max": 0.1,
    "event_timeout": 1.0,
}


def events_of(store: Store, order_id: uuid.UUID) -> list[dict[str, Any]]:
    """The order's events as written to the outbox, in seq order."""
    rows = subscriptions.read(
        store, partial(outbox_sql.events_of, store.dialect, order_id=order_id)
    )
    return [json.loads(body) for _id, _type, body in rows]


def subscribe_sink(store: Store, services_url: str, types: Iterable[str] = ()) -> str:
    """Subscribe the reference sink (downstream/sink.py) and give it the secret."""
    url = f"{services_url}/sink"
    added = subscriptions.add_webhook(store, url, outbox.parse_types(types))
    HTTP.put(f"{url}/secret", json={"secret": added.secret}).raise_for_status()
    return added.secret


def label(store: Store, url: str) -> str:
    """The webhook at `url` as /metrics, /healthz and the relay's logs name it."""
    return subscriptions.find(store, url).label


def sink_seen(services_url: str) -> dict[str, Any]:
    seen: dict[str, Any] = HTTP.get(f"{services_url}/sink").json()
    return seen


def seq_of(event: dict[str, Any]) -> int:
    return outbox_sql.split_id(event["id"])[1]


def out_of_order(events: Iterable[dict[str, Any]]) -> list[str]:
    """Event ids that arrived after a later event of the same order (first arrivals)."""
    last: dict[str, int] = defaultdict(lambda: -1)
    wrong = []
    for event in events:
        seq = seq_of(event)
        if seq <= last[event["subject"]]:
            wrong.append(event["id"])
        last[event["subject"]] = max(seq, last[event["subject"]])
    return wrong


@asynccontextmanager
async def relaying(store: Store, settings: Settings, **owner: str) -> AsyncIterator[Relay]:
    """A relay delivering in the background for the duration of the block."""
    relay = Relay(store, settings, **owner)
    task = asyncio.create_task(relay.run())
    try:
        yield relay
    finally:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass


async def order_by_order_until(
    store: Store, endpoint: Endpoint, arrived: Callable[[Request], bool], *, what: str
) -> Request:
    """The first request `endpoint` gets from now on that is `arrived`; an order created
    for each, one at a time once the previous one's event has come (a running relay sees a
    changed destination at its next read of them, every 2 s: fsm.relay.REFRESH_SECONDS)."""
    seen = created = len(endpoint.requests)

    async def found() -> Request | None:
        nonlocal seen, created
        for request in endpoint.requests[seen:]:
            if arrived(request):
                return request
        seen = len(endpoint.requests)
        if seen >= created:
            await store.create_order(user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1)
            created += 1
        return None

    return await wait_until_async(found, what=what)


MIX = [
    (ORDINARY_USER_ID, WIDGET_ID),
    (POOR_USER_ID, WIDGET_ID),
    (ORDINARY_USER_ID, MISSING_PRODUCT_ID),
]


async def orders(store: Store, executor: Executor, n: int) -> list[uuid.UUID]:
    """`n` orders of the mix, driven concurrently to their end."""

    async def one(user: int, product: int) -> uuid.UUID:
        order, _ = await store.create_order(
            user_id=user, product_id=product, quantity=1, owner=executor.owner
        )
        await executor.drive(order)
        return order.id

    return list(await asyncio.gather(*(one(*MIX[i % len(MIX)]) for i in range(n))))


def expected(store: Store, ids: list[uuid.UUID], types: tuple[str, ...]) -> list[str]:
    """The ids of the orders' events of these types, order by order."""
    return [e["id"] for i in ids for e in events_of(store, i) if e["type"] in types]


async def below_horizon(store: Store) -> None:
    """Wait until every committed event is readable by a relay: on PostgreSQL each event's
    transaction, and every one that began before it, has ended (another test's transaction
    held open on the same server holds the horizon back); on SQLite at once."""
    if store.dialect.name == "sqlite":
        return

    def readable() -> bool:
        with store.engine.connect() as conn:
            return bool(
                conn.exec_driver_sql(
                    "SELECT COALESCE(MAX(txid), 0) < "
                    "pg_snapshot_xmin(pg_current_snapshot())::text::bigint FROM outbox_events"
                ).scalar_one()
            )

    await wait_until_async(readable, what="the events below the horizon")
