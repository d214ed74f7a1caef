"""Resume stuck orders: the `resume` command, `worker` and the sweep inside `serve`.

An order is stuck when it is not terminal, nobody holds its lease and it has not moved for
a while, or at once when a stopping driver handed it back (fsm.sql.HANDED_BACK). Each is
claimed atomically (several workers share the load without driving the same order twice)
and driven from its persisted state, never from scratch. An order whose driver died under
it ORDER_SAGA_MAX_INTERRUPTIONS times in a row is left to a person (Order.held).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from fsm.errors import ConcurrencyError, outage, outage_line
from fsm.executor import Executor
from fsm.models import HELD_HINT, Order
from fsm.operator import Audit
from fsm.settings import Settings
from fsm.sql import PARKED
from fsm.store import Store, utcnow

log = logging.getLogger("order_saga.recovery")

Progress = Callable[[Order, str], None]


@dataclass
class ResumeSummary:
    found: int = 0
    resumed: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)  # final status -> count
    skipped_leased: int = 0
    lost_to_other_driver: int = 0
    errors: int = 0
    held: int = 0  # held (Order.held): given back undriven by the sweep, or left by resume

    def as_dict(self) -> dict[str, object]:
        """The summary as JSON-ready data (`order-saga resume --json`)."""
        return {
            "found": self.found,
            "resumed": self.resumed,
            "outcomes": dict(self.outcomes),
            "skipped_leased": self.skipped_leased,
            "lost_to_other_driver": self.lost_to_other_driver,
            "errors": self.errors,
            "held": self.held,
        }

    def line(self) -> str:
        parts = [f"resumed {self.resumed}"]
        for status in (
            "completed",
            "failed",
            "rejected",
            "cancelled",
            "needs_attention",
            "running",
            "compensating",
        ):
            parts.append(f"{status} {self.outcomes.get(status, 0)}")
        parts.append(f"skipped (leased elsewhere) {self.skipped_leased}")
        if self.lost_to_other_driver:
            parts.append(f"lost to another driver {self.lost_to_other_driver}")
        if self.errors:
            parts.append(f"errors {self.errors}")
        if self.held:
            parts.append(f"held for an operator {self.held}")
        return ", ".join(parts)


async def resume_stuck(
    *,
    store: Store,
    executor: Executor,
    older_than: float,
    limit: int,
    dry_run: bool = False,
    concurrency: int = 8,
    due_only: bool = True,
    progress: Progress | None = None,
    audit: Audit | None = None,
    take_held: bool = False,
) -> ResumeSummary:
    """Drive stuck orders, at most `concurrency` at once and `limit` in all, each at most
    once: a slot that frees up is refilled by a new claim, so several workers share the
    backlog and none waits for the slowest order of a batch.
    `due_only=False` (an operator's `resume`) ignores the retry schedule, and takes parked
    orders whatever `older_than` (no driver holds one): retry now.
    `audit` (a person's `resume`, not the sweep): each order's log first names who.
    Held orders (Order.held: their driver died under them again and again) are left alone
    unless `take_held` (`resume --include-held`): a routine drain must not restart a crash
    loop in the operator's own process; a dry run names them."""
    moved_before = utcnow() - timedelta(seconds=older_than)
    leased = await asyncio.to_thread(store.count_leased_stuck, moved_before=moved_before)
    summary = ResumeSummary(skipped_leased=leased)
    if dry_run:
        found = await asyncio.to_thread(
            store.find_stuck, moved_before=moved_before, limit=limit, due_only=due_only
        )
        for order in found:
            if not take_held and order.held(store.max_interruptions):
                summary.held += 1
                if progress:
                    progress(order, f"held: left alone ({HELD_HINT})")
                continue
            summary.found += 1
            if progress:
                progress(order, "would resume")
        return summary
    # Orders driven here that still match the claim (did not move, or parked again, which
    # an operator's claim takes at any age): never twice a call.
    stalled: set[uuid.UUID] = set()

    # Claimed, task not yet started: a task cancelled before its first step never runs
    # its body, so its lease is given back here.
    unstarted: dict[uuid.UUID, Order] = {}

    async def one(order: Order) -> None:
        unstarted.pop(order.id, None)
        try:
            await executor.drive(order, audit=audit)
        except ConcurrencyError:
            summary.lost_to_other_driver += 1
            return
        except Exception as exc:
            if outage(exc):  # one line a retry: the traceback says nothing more
                log.warning("resume of order %s stopped: %s", order.id, outage_line(exc))
                log.debug("resume of order %s stopped", order.id, exc_info=True)
            else:
                log.exception("resume of order %s failed", order.id)
            summary.errors += 1
            return
        finally:  # a parked order still matches an operator's claim, whenever it moved
            if order.updated_at <= moved_before or (not due_only and order.state == PARKED):
                stalled.add(order.id)
        if audit is None and order.held(store.max_interruptions):
            summary.held += 1  # not driven: the executor gave it back (and said so)
            return
        summary.resumed += 1
        summary.outcomes[order.status] += 1
        if progress:
            progress(order, order.status)

    running: set[asyncio.Task[None]] = set()
    # The sweep drives orders whose driver died under them again and again (fsm.sql.
    # SUSPECT) one at a time, the rest as usual: an order that was only beside the
    # culprit each time then moves and its count goes back to 0, and is not held with it.
    alone = audit is None
    suspect: asyncio.Task[None] | None = None
    exhausted = suspects_exhausted = False

    async def claimed(free: int, suspects: bool | None) -> list[asyncio.Task[None]]:
        """Claim up to `free` and start driving them; their tasks ([]: none left)."""
        batch = await store.claim_batch(
            owner=executor.owner, moved_before=moved_before, limit=free,
            exclude=stalled, due_only=due_only, take_held=take_held, suspects=suspects,
        )  # fmt: skip
        summary.found += len(batch)
        unstarted.update((order.id, order) for order in batch)
        started = [asyncio.create_task(one(order)) for order in batch]
        running.update(started)
        return started

    try:
        while True:
            free = min(concurrency - len(running), limit - summary.found)
            if free > 0 and not exhausted:
                exhausted = not await claimed(free, False if alone else None)
            free = min(concurrency - len(running), limit - summary.found)
            if (
                alone
                and free > 0
                and not suspects_exhausted
                and (suspect is None or suspect.done())
            ):
                taken = await claimed(1, True)
                suspects_exhausted = not taken
                suspect = taken[0] if taken else None
            if not running:
                return summary
            _, still = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            running = set(still)
    finally:  # cancelled (SIGTERM): every run releases its lease before we return
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        if unstarted:
            await store.give_back(list(unstarted.values()), executor.owner)


async def sweep_forever(*, store: Store, executor: Executor, settings: Settings) -> None:
    """Resume stuck orders until cancelled: at once again while there is a backlog,
    otherwise every `sweep_interval` seconds."""
    while True:
        found = resumed = 0
        try:
            summary = await resume_stuck(
                store=store,
                executor=executor,
                older_than=settings.sweep_older_than,
                limit=settings.sweep_batch,
                concurrency=settings.sweep_concurrency,
            )
            found, resumed = summary.found, summary.resumed
            if summary.found:
                log.info("sweep: %s", summary.line())
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if outage(exc):  # every few seconds for as long as the outage lasts: one line each
                log.warning(
                    "sweep failed (%s); trying again in %ss",
                    outage_line(exc),
                    settings.sweep_interval,
                )
                log.debug("sweep failed", exc_info=True)
            else:
                log.exception("sweep failed; trying again in %ss", settings.sweep_interval)
        if found < settings.sweep_batch or not resumed:
            await asyncio.sleep(settings.sweep_interval)
