"""The only module of `bench` that calls the engine's Python API (Store, Executor, ...).

When that API changes, adapt this file alone: `open_engine` builds whatever drives orders
for a database URL with given services (through `fsm.wiring.open_saga`, as the product
does), and `Engine.order` creates one order and drives it to the end, returning its final
state. The schema must already exist (the benchmarks make it with `fsm.migrate.upgrade`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fsm.clients import Services
from fsm.recovery import resume_stuck
from fsm.settings import Settings
from fsm.store import Store
from fsm.wiring import Saga, open_saga


class Engine:
    def __init__(self, saga: Saga) -> None:
        self.saga = saga
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
        yield Engine(saga)


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
