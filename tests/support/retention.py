"""Orders in every situation retention must tell apart (terminal of each kind, parked,
running, leased), driven through the real executor and services, and the database-wide
checks a prune must keep true (no orphan transitions)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import date, timedelta

from sqlalchemy import func, select, text

from downstream.seed import (
    MISSING_PRODUCT_ID,
    ORDINARY_USER_ID,
    POOR_USER_ID,
    SOLD_OUT_PRODUCT_ID,
    WIDGET_ID,
)
from fsm import partitions
from fsm.executor import Executor
from fsm.models import OrderTable, TransitionTable
from fsm.store import Store
from tests.support.services import Downstream, Fault, set_faults

orders = OrderTable.__table__  # type: ignore[attr-defined]
transitions = TransitionTable.__table__  # type: ignore[attr-defined]
REFUND_DOWN = Fault("user.refund", "error")  # count 1000 > the retry budget: parks


@dataclass
class Population:
    """Order ids by what a prune must do with them."""

    eligible: list[uuid.UUID] = field(default_factory=list)  # terminal, unleased
    kept: dict[str, uuid.UUID] = field(default_factory=dict)  # why -> id


async def populate(
    store: Store, executor: Executor, downstream: Downstream, *, completed: int = 3
) -> Population:
    """`completed` completed orders, one rejected, one failed (all eligible); a parked
    one, a pending one nobody drove, and a completed one someone holds the lease of."""
    found = Population()

    async def drive(user: int, product: int) -> uuid.UUID:
        order, _ = await store.create_order(
            user_id=user, product_id=product, quantity=1, owner=executor.owner
        )
        await executor.drive(order)
        return order.id

    for _ in range(completed):
        found.eligible.append(await drive(ORDINARY_USER_ID, WIDGET_ID))
    found.eligible.append(await drive(ORDINARY_USER_ID, MISSING_PRODUCT_ID))  # rejected
    found.eligible.append(await drive(POOR_USER_ID, WIDGET_ID))  # failed
    set_faults(downstream.url, [REFUND_DOWN])
    found.kept["parked"] = await drive(ORDINARY_USER_ID, SOLD_OUT_PRODUCT_ID)
    set_faults(downstream.url, ())
    live, _ = await store.create_order(user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1)
    found.kept["live"] = live.id
    leased = await drive(ORDINARY_USER_ID, WIDGET_ID)
    assert await store.claim(order_id=leased, owner="an operator's cancel") is not None
    found.kept["leased"] = leased
    statuses = {store.get(i).status for i in found.eligible}
    assert statuses == {"completed", "rejected", "failed"}, statuses
    assert store.get(found.kept["parked"]).status == "needs_attention"
    return found


def orphan_transitions(store: Store) -> int:
    """Transition rows whose order is gone."""
    query = (
        select(func.count())
        .select_from(transitions)
        .where(transitions.c.order_id.not_in(select(orders.c.id)))
    )
    with store.engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def transition_count(store: Store, order_id: uuid.UUID) -> int:
    query = select(func.count()).select_from(transitions).where(transitions.c.order_id == order_id)
    with store.engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def age_into(store: Store, order_ids: list[uuid.UUID], day: date) -> str:
    """PostgreSQL: move these orders (and their logs, with PostgreSQL's row movement) into
    `day`'s partition, as if created then; the partition's name."""
    with store.engine.connect() as conn:
        partitions.ensure(conn, first=day, last=day)
    start, _ = partitions.bounds(day)
    with store.engine.begin() as conn:
        for order_id in order_ids:
            old = conn.execute(select(orders.c.created_at).where(orders.c.id == order_id)).scalar()
            when = start + (old - old.replace(hour=0, minute=0, second=0, microsecond=0))
            conn.execute(orders.update().where(orders.c.id == order_id).values(created_at=when))
            conn.execute(
                transitions.update()
                .where(transitions.c.order_id == order_id)
                .values(order_created_at=when)
            )
    return partitions.name_of(day)


def partition_names(store: Store) -> set[str]:
    with store.engine.connect() as conn:
        return {p.name for p in partitions.existing(conn)}


def rows_in(store: Store, table: str) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())


def created_earlier(store: Store, order_ids: list[uuid.UUID], by: timedelta) -> None:
    """Move these orders' creation (and their logs' copy of it) `by` into the past, as if
    placed then (PostgreSQL: the log's rows move to that day's partition, made first)."""
    with store.engine.connect() as conn:
        created = {
            i: conn.execute(select(orders.c.created_at).where(orders.c.id == i)).scalar_one() - by
            for i in order_ids
        }
        if conn.dialect.name == "postgresql":
            days = sorted(when.date() for when in created.values())
            partitions.ensure(conn, first=days[0], last=days[-1])
        conn.commit()
    with store.engine.begin() as conn:
        for order_id, when in created.items():
            conn.execute(orders.update().where(orders.c.id == order_id).values(created_at=when))
            conn.execute(
                transitions.update()
                .where(transitions.c.order_id == order_id)
                .values(order_created_at=when)
            )
