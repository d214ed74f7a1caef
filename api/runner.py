"""Background runs of the API process: order runs that outlive their request (a new
order's, a resume's, a cancel's, the console's actions: each request waits at most
RESPOND_WITHIN for its run, then answers 202 + Location and the run goes on here), the
periodic sweep for stuck orders (`start_sweeper`, off with `serve --no-sweep`) and the
upkeep every process does whatever its sweep (`start_upkeep`: fsm.upkeep's passes, as
`worker` runs them). Keeps task references so nothing is garbage-collected.

Stopping comes in two steps: `stop_sweeping` when shutdown begins (the sweep and the
upkeep stop, so no new work is picked up while requests in flight finish; the sweep's own
runs give their leases back at once, as a stopped `worker`'s do), then `stop` after the
grace (the runs left are cancelled and release their leases)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from functools import partial
from typing import Any

from fsm import upkeep
from fsm.errors import outage
from fsm.executor import Executor
from fsm.models import Order
from fsm.recovery import sweep_forever
from fsm.settings import Settings
from fsm.store import Store

log = logging.getLogger("order_saga.runner")


def _leaves(error: BaseException) -> BaseException:
    """An exception group's first leaf (its steps failed alike), else the error itself."""
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


class Runner:
    def __init__(self, *, store: Store, executor: Executor, settings: Settings) -> None:
        self.store = store
        self.executor = executor
        self.settings = settings
        self.tasks: set[asyncio.Task[object]] = set()
        self.passes: set[asyncio.Task[object]] = set()  # the sweep and the other passes

    def start(self, order: Order) -> asyncio.Task[Order]:
        """POST /orders: drive a new order (leased to this executor when it was created)."""
        # Reserved here, before the task runs: a resume or cancel of this order arriving
        # in between is refused (409), not run beside it.
        return self.adopt(order, self.executor.drive(order))

    def adopt(self, order: Order, run: Coroutine[Any, Any, Order]) -> asyncio.Task[Order]:
        """Drive `order` in the background: `run` is its drive, reserved and leased already
        (`Executor.drive`, `prepare_run`, `prepare_cancel`). The request that started it
        waits for it at most RESPOND_WITHIN (`within`), then answers 202 and the run goes on
        here; an error it ends with is logged and raised to whoever awaits the task."""
        task: asyncio.Task[Order] = asyncio.create_task(run)
        self.tasks.add(task)
        task.add_done_callback(partial(self._ended, order))
        return task

    def _ended(self, order: Order, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            # the order stays persisted; the sweep (or a resume) continues it
            if outage(error):  # the database is gone: one line, the traceback tells no more
                log.warning("run of order %s stopped: %s", order.id, _leaves(error))
                log.debug("run of order %s stopped", order.id, exc_info=error)
            else:
                log.error("run of order %s stopped", order.id, exc_info=error)

    async def within(self, task: asyncio.Task[Order]) -> bool:
        """Wait for a run at most RESPOND_WITHIN: True when it has ended (`task.result()`
        is its order, or raises its error), False while it goes on in the background (the
        answer is 202 + Location). A request that goes away leaves the run going."""
        done, _ = await asyncio.wait({task}, timeout=self.settings.respond_within)
        return bool(done)

    def start_sweeper(self) -> None:
        """The recovery sweep: stuck orders resumed (leases keep each to one driver)."""
        self._keep(
            sweep_forever(store=self.store, executor=self.executor, settings=self.settings),
            name="sweep",
        )

    def start_upkeep(self) -> None:
        """Retention, roll-up and partitions (fsm.upkeep.passes): each safe in several
        processes at once, so every process runs them, its sweep on or off."""
        for name, work in upkeep.passes(store=self.store, settings=self.settings).items():
            self._keep(work, name=name)

    def _keep(self, work: Coroutine[Any, Any, None], *, name: str) -> None:
        task: asyncio.Task[Any] = upkeep.start(work, name=name)  # an error it ends with: logged
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
        await upkeep.stop(list(self.tasks))
