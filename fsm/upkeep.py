"""The background work every long-running process does beside its orders, written once for
`serve` (api/runner.py, api/app.py) and `worker` (order_saga/cli.py): the upkeep passes
(retention's pruning when set, the heatmap's roll-up, the log's day partitions on
PostgreSQL) and the supervised relay child (ORDER_SAGA_RELAY).

Each pass is safe in several processes at once (one pruner at a time, a roll's cursor moved
by compare-and-set, CREATE ... IF NOT EXISTS), so every process runs them, its sweep on or
off. Stopping cancels them and waits for them to end (a pass's step in a worker thread
finishes first), so nothing of theirs still runs when the store is closed; an error one
ended with is logged, never lost. No HTTP, no orders driven here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Collection, Coroutine
from contextlib import asynccontextmanager
from typing import Any

from fsm import partitions, relay_child, retention, rollup
from fsm.settings import Settings
from fsm.store import Store

log = logging.getLogger("order_saga.upkeep")


def passes(*, store: Store, settings: Settings) -> dict[str, Coroutine[Any, Any, None]]:
    """The upkeep passes `settings` and the database call for, by name, each running until
    cancelled."""
    found: dict[str, Coroutine[Any, Any, None]] = {}
    if retention.enabled(settings):  # issue 22: the background retention pass
        found["retention"] = retention.prune_forever(engine=store.engine, settings=settings)
    if settings.heat_roll_interval:  # the heatmap's roll-up kept current
        found["roll-up"] = rollup.roll_forever(store.engine, interval=settings.heat_roll_interval)
    if store.is_postgres:  # the log's day partitions, a week ahead (fsm.partitions)
        found["partitions"] = partitions.maintain_forever(store.engine)
    return found


def start_relay(*, store: Store, settings: Settings) -> asyncio.Task[None] | None:
    """The supervised relay child (order events delivered from a process of their own),
    when ORDER_SAGA_RELAY is on; None when it is off."""
    if not settings.relay:
        return None
    return start(relay_child.supervise(settings, store), name="relay")


def start(work: Coroutine[Any, Any, None], *, name: str | None = None) -> asyncio.Task[None]:
    """`work` as a task whose error, should it end with one, is logged when it ends (a pass
    that stopped is otherwise only noticed by its absence)."""
    task = asyncio.create_task(work, name=name)
    task.add_done_callback(_ended)
    return task


def _ended(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (error := task.exception()) is not None:
        log.error("background task %s stopped", task.get_name(), exc_info=error)


async def stop(tasks: Collection[asyncio.Task[Any]]) -> None:
    """Cancel `tasks` and wait until every one has ended (their errors are logged by
    `start`'s callback, not raised here)."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@asynccontextmanager
async def running(*, store: Store, settings: Settings) -> AsyncIterator[list[asyncio.Task[None]]]:
    """The upkeep passes and the relay for the block (`worker`); on the way out all are
    cancelled and awaited, before the caller closes the store."""
    found = passes(store=store, settings=settings)
    tasks = [start(work, name=name) for name, work in found.items()]
    if (relay := start_relay(store=store, settings=settings)) is not None:
        tasks.append(relay)
    try:
        yield tasks
    finally:
        await stop(tasks)
