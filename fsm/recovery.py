"""Resume stuck orders: the `resume` command, `worker` and the sweep inside `serve`.

An order is stuck when it is not terminal, nobody holds its lease and it has not moved for
a while. Each is claimed atomically (several workers share the load without driving the
same order twice) and driven from its persisted state, never from scratch.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from fsm.errors import ConcurrencyError
from fsm.executor import Executor
from fsm.models import Order
from fsm.settings import Settings
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
) -> ResumeSummary:
    """Claim stuck orders a few at a time (so several workers share the load) and drive
    each to a terminal state or park it; at most `limit` orders, each at most once.
    `due_only=False` (an operator's `resume`) ignores the retry schedule: retry now."""
    moved_before = utcnow() - timedelta(seconds=older_than)
    summary = ResumeSummary(skipped_leased=store.count_leased_stuck(moved_before=moved_before))
    if dry_run:
        for order in store.find_stuck(moved_before=moved_before, limit=limit, due_only=due_only):
            summary.found += 1
            if progress:
                progress(order, "would resume")
        return summary
    seen: set[uuid.UUID] = set()

    async def one(order: Order) -> None:
        try:
            await executor.drive(order)
        except ConcurrencyError:
            summary.lost_to_other_driver += 1
            return
        except Exception:
            log.exception("resume of order %s failed", order.id)
            summary.errors += 1
            return
        summary.resumed += 1
        summary.outcomes[order.status] += 1
        if progress:
            progress(order, order.status)

    while summary.found < limit:
        batch = store.claim_batch(
            owner=executor.owner,
            moved_before=moved_before,
            limit=min(concurrency, limit - summary.found),
            exclude=seen,
            due_only=due_only,
        )
        if not batch:
            break
        summary.found += len(batch)
        seen.update(o.id for o in batch)
        await asyncio.gather(*(one(o) for o in batch))
    return summary


async def sweep_forever(*, store: Store, executor: Executor, settings: Settings) -> None:
    """Resume stuck orders every `sweep_interval` seconds until cancelled."""
    while True:
        try:
            summary = await resume_stuck(
                store=store,
                executor=executor,
                older_than=settings.sweep_older_than,
                limit=settings.sweep_batch,
            )
            if summary.found:
                log.info("sweep: %s", summary.line())
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("sweep failed; trying again in %ss", settings.sweep_interval)
        await asyncio.sleep(settings.sweep_interval)
