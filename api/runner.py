"""Background runs of the API process: order runs that outlive their request, the
periodic sweep for stuck orders (`start_sweeper`, off with `serve --no-sweep`) and the
upkeep every process does whatever its sweep (`start_upkeep`): the heatmap's roll-up, the
log's day partitions on PostgreSQL and, when retention is set, the pruning pass. Keeps task
references so nothing is garbage-collected.

Stopping comes in two steps: `stop_sweeping` when shutdown begins (the sweep and the
upkeep stop, so no new work is picked up while requests in flight finish; the sweep's own
runs give their leases back at once, as a stopped `worker`'s do), then `stop` after the
grace (the runs left are cancelled and release their leases)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from fsm import partitions, retention, rollup
from fsm.executor import Executor
from fsm.models import Order
from fsm.recovery import sweep_forever
from fsm.settings import Settings
from fsm.store import Store

log = logging.getLogger("order_saga.runner")


class Runner:
    def __init__(self, *, store: Store, executor: Executor, settings: Settings) -> None:
        self.store = store
        self.executor = executor
        self.settings = settings
        self.tasks: set[asyncio.Task[object]] = set()
        self.passes: set[asyncio.Task[object]] = set()  # the sweep and the other passes

    def start(self, order: Order) -> asyncio.Task[object]:
        # Reserved here, before the task runs: a resume or cancel of this order arriving
        # in between is refused (409), not run beside it.
        run = self.executor.drive(order)
        task: asyncio.Task[object] = asyncio.create_task(self._drive(order, run))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _drive(self, order: Order, run: Coroutine[Any, Any, Order]) -> object:
        try:
            return await run
        except Exception:  # the order stays persisted; the sweep resumes it
            log.exception("run of order %s stopped", order.id)
            return None

    def start_sweeper(self) -> None:
        """The recovery sweep: stuck orders resumed (leases keep each to one driver)."""
        self._keep(sweep_forever(store=self.store, executor=self.executor, settings=self.settings))

    def start_upkeep(self) -> None:
        """Retention, roll-up and partitions: each safe in several processes at once (one
        pruner at a time, a roll's cursor moved by compare-and-set, CREATE ... IF NOT
        EXISTS), so every process runs them, its sweep on or off."""
        if retention.enabled(self.settings):  # issue 22: the background retention pass
            self._keep(retention.prune_forever(engine=self.store.engine, settings=self.settings))
        if self.settings.heat_roll_interval:  # the heatmap's roll-up kept current
            self._keep(
                rollup.roll_forever(self.store.engine, interval=self.settings.heat_roll_interval)
            )
        if self.store.is_postgres:  # the log's day partitions, a week ahead (fsm.partitions)
            self._keep(partitions.maintain_forever(self.store.engine))

    def _keep(self, work: Coroutine[Any, Any, object]) -> None:
        task: asyncio.Task[object] = asyncio.create_task(work)
        for kept in (self.tasks, self.passes):
            kept.add(task)
            task.add_done_callback(kept.discard)

    def stop_sweeping(self) -> None:
        """Shutdown has begun: pick up no more work. The sweep and the other passes are
        cancelled (what the sweep was driving releases its leases, for the next driver to
        continue at once); the runs of requests keep going until `stop`."""
        for task in list(self.passes):
            task.cancel()

    async def stop(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
