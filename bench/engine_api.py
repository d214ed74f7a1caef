"""The only module of `bench` that calls the engine's Python API (Store, Executor, ...).

When that API changes, adapt this file alone: `open_engine` builds whatever drives orders
for a database URL with given services (through `fsm.wiring.open_saga`, as the product
does), and `Engine.order` creates one order and drives it to the end, returning its final
state. The schema must already exist (the benchmarks make it with `fsm.migrate.upgrade`).
The engine runs with the garbage collector as `serve` and `worker` set it
(`order_saga.heap.settle`), so the engine's CPU per order and serve's are comparable.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial

from fsm import outbox, outbox_sql, relay_child, subscriptions
from fsm.clients import Services
from fsm.recovery import resume_stuck
from fsm.settings import Settings
from fsm.store import Store
from fsm.wiring import Saga, open_saga
from order_saga import heap


class Engine:
    def __init__(self, saga: Saga, url: str) -> None:
        self.saga, self.url = saga, url
        self.store: Store = saga.store
        self.executor = saga.executor

    async def order(self, *, user_id: int, product_id: int, quantity: int) -> str:
        """Create one order (already leased to this executor) and drive it; its final state."""
        order, _ = await self.store.create_order(
            user_id=user_id, product_id=product_id, quantity=quantity, owner=self.executor.owner
        )
        await self.executor.drive(order)
        return str(order.state)


@asynccontextmanager
async def open_engine(url: str, services: Services) -> AsyncIterator[Engine]:
    """The engine on `url` with the default settings; closed on exit."""
    async with open_saga(Settings(database_url=url), services=services) as saga:
        with settled_heap():
            yield Engine(saga, url)


@contextmanager
def settled_heap() -> Iterator[None]:
    """The collector as `serve` and `worker` set it once started; Python's defaults after
    (the bench process goes on to other phases)."""
    threshold = gc.get_threshold()
    heap.settle()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


# -- order events: the relay in the engine's process, as `serve` runs it --------------------


async def subscribe_webhook(engine: Engine, url: str) -> str:
    """`order-saga webhooks add URL` (every default event type); its signing secret."""
    added = await asyncio.to_thread(
        subscriptions.add_webhook, engine.store, url, outbox.DEFAULT_TYPES
    )
    return added.secret


async def unsubscribe_all(engine: Engine) -> None:
    """Every destination removed (its undelivered events with it)."""
    store = engine.store
    for destination in await asyncio.to_thread(subscriptions.destinations, store):
        remove = partial(outbox_sql.remove_destination, store.dialect)
        await store.committer.submit(partial(remove, destination_id=destination.id))


async def destinations(engine: Engine) -> list[str]:
    found = await asyncio.to_thread(subscriptions.destinations, engine.store)
    return [d.name for d in found]


async def backlog(engine: Engine) -> dict[str, subscriptions.Lag]:
    """destination -> (undelivered events, seconds since the oldest of them, dead letters)."""
    return await asyncio.to_thread(subscriptions.lags, engine.store)


@asynccontextmanager
async def relaying(engine: Engine, amqp_url: str | None) -> AsyncIterator[None]:
    """The relay of the engine's process for the block, as `serve` and `worker` run it: a
    child process at `relay_nice` (fsm.relay_child; RabbitMQ too when `amqp_url`)."""
    async with relay_child.running(
        Settings(database_url=engine.url, amqp_url=amqp_url), engine.store
    ):
        yield


async def sweep(url: str, services: Services, count: int) -> dict[str, int]:
    """The recovery sweep of a process with the default settings (what `order-saga resume`
    runs) over up to `count` stuck orders; final status -> how many."""
    settings = Settings(database_url=url)
    async with open_saga(settings, services=services) as saga:
        summary = await resume_stuck(
            store=saga.store,
            executor=saga.executor,
            older_than=0,
            limit=count,
            concurrency=settings.sweep_concurrency,
            due_only=False,
        )
    return dict(summary.outcomes)


def prune(url: str, *, older_than: float) -> tuple[int, float]:
    """`order-saga prune --older-than` in this process, no archive: (orders deleted, seconds)."""
    from fsm.retention import Pruner
    from fsm.store import make_engine

    engine = make_engine(url)
    try:
        summary = Pruner(engine, older_than=older_than).run()
    finally:
        engine.dispose()
    return summary.deleted, summary.seconds
