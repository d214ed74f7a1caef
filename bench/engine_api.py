"""The only module of `bench` that calls the engine's Python API (Store, Executor, ...).

When that API changes, adapt this file alone: `open_engine` builds whatever drives orders
for a database URL with given services, and `Engine.order` creates one order and drives it
to the end, returning its final state. The schema must already exist (the benchmarks make
it with `fsm.migrate.upgrade`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fsm.clients import Services
from fsm.executor import Executor, RetryPolicy
from fsm.store import Store, make_engine


class Engine:
    def __init__(self, store: Store, executor: Executor) -> None:
        self.store = store
        self.executor = executor

    async def order(self, *, user_id: int, product_id: int, quantity: int) -> str:
        """Create one order (leased to this executor) and drive it; its final state."""
        order, _ = self.store.create_order(
            user_id=user_id, product_id=product_id, quantity=quantity, owner=self.executor.owner
        )
        await self.executor.drive(order)
        return str(order.state)


@asynccontextmanager
async def open_engine(url: str, services: Services) -> AsyncIterator[Engine]:
    """Store + executor on `url` with the default retry policy; closed on exit."""
    sql = make_engine(url)
    store = Store(sql)
    try:
        yield Engine(store, Executor(store=store, services=services, policy=RetryPolicy()))
    finally:
        sql.dispose()
