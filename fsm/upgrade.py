"""Can the installed machine drive every live order? `order-saga check-upgrade`, and the same
check run by `serve` and `worker` at start (issue 10).

Orders persist their states as names, so a release that renames or removes a state or an
edge would strand the orders sitting there. The check reads every non-terminal order with
ONE grouped query (state + step states + machine version), so its cost is one scan of the
orders table whatever their number, and checks each group against a machine given as
`Tables` (the installed one by default; tests pass a modified copy): the order state and
step states exist, and a terminal state (a final state, for a step) is still reachable over
the declared edges. Read-only: it never drives or rewrites an order.
"""

from __future__ import annotations

import logging
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from prometheus_client import Gauge
from sqlalchemy import Engine, func, select, tuple_
from sqlalchemy.exc import SQLAlchemyError

from fsm.machine import (
    ORDER_TRANSITIONS,
    STEP_TRANSITIONS,
    TERMINAL_ORDER_STATES,
    OrderState,
    Step,
    StepState,
    flat_edges,
    version_of,
)
from fsm.models import OrderTable
from fsm.store import Store

log = logging.getLogger("order_saga.upgrade")
orders = OrderTable.__table__  # type: ignore[attr-defined]

UNDRIVABLE = Gauge(
    "order_saga_undrivable_orders",
    "Live orders the installed machine cannot drive (skipped by the sweep), found at start",
)

STEPS = tuple(s.value for s in Step)  # payment, inventory, shipping: the column order below
Combo = tuple[str, str, str, str]  # (order state, payment, inventory, shipping)


@dataclass(frozen=True)
class Tables:
    """One version of both machines as plain data: what the check runs against."""

    order_states: frozenset[str]
    order_terminal: frozenset[str]
    order_edges: tuple[tuple[str, str, str], ...]  # (trigger, source, dest)
    step_states: frozenset[str]
    step_edges: tuple[tuple[str, str, str], ...]

    @classmethod
    def installed(cls) -> Tables:
        return cls(
            order_states=frozenset(s.value for s in OrderState),
            order_terminal=frozenset(s.value for s in TERMINAL_ORDER_STATES),
            order_edges=tuple(flat_edges(ORDER_TRANSITIONS)),
            step_states=frozenset(s.value for s in StepState),
            step_edges=tuple(flat_edges(STEP_TRANSITIONS)),
        )

    @property
    def version(self) -> str:
        return version_of(
            order_states=self.order_states,
            order_terminal=self.order_terminal,
            order_edges=list(self.order_edges),
            step_states=self.step_states,
            step_edges=list(self.step_edges),
        )

    def renamed(self, scope: str, old: str, new: str) -> Tables:
        """This machine with one state renamed ("order" or "step" scope): a test's new machine."""

        def swap(name: str) -> str:
            return new if name == old else name

        def edges(table: tuple[tuple[str, str, str], ...]) -> tuple[tuple[str, str, str], ...]:
            return tuple(sorted((t, swap(s), swap(d)) for t, s, d in table))

        if scope == "order":
            return replace(
                self,
                order_states=frozenset(map(swap, self.order_states)),
                order_terminal=frozenset(map(swap, self.order_terminal)),
                order_edges=edges(self.order_edges),
            )
        return replace(
            self,
            step_states=frozenset(map(swap, self.step_states)),
            step_edges=edges(self.step_edges),
        )

    def reasons(self, state: str, steps: Mapping[str, str]) -> list[str]:
        """Why this machine cannot drive an order in `state` with `steps`; [] if it can."""
        why: list[str] = []
        if state not in self.order_states:
            why.append(f"order state {state!r} is not a state of this machine")
        elif not _reaches(state, self.order_edges, self.order_terminal):
            why.append(f"no declared path from order state {state!r} to a terminal state")
        finals = _sinks(self.step_states, self.step_edges)
        for step, step_state in steps.items():
            if step_state not in self.step_states:
                why.append(f"{step} state {step_state!r} is not a state of this machine")
            elif not _reaches(step_state, self.step_edges, finals):
                why.append(f"no declared path from {step} state {step_state!r} to a final state")
        return why


def _sinks(states: Iterable[str], edges: Iterable[tuple[str, str, str]]) -> frozenset[str]:
    """A step's final states: those with no outgoing edge."""
    sources = {source for _, source, _ in edges}
    return frozenset(s for s in states if s not in sources)


def _reaches(start: str, edges: Iterable[tuple[str, str, str]], goals: frozenset[str]) -> bool:
    """Breadth-first search over the declared edges."""
    nexts: dict[str, set[str]] = defaultdict(set)
    for _, source, dest in edges:
        nexts[source].add(dest)
    seen, queue = {start}, deque([start])
    while queue:
        state = queue.popleft()
        if state in goals:
            return True
        for dest in nexts[state] - seen:
            seen.add(dest)
            queue.append(dest)
    return False


@dataclass(frozen=True)
class Group:
    """Live orders sharing one state, one set of step states and one machine version."""

    state: str
    steps: dict[str, str]
    machine_version: str
    count: int

    @property
    def combo(self) -> Combo:
        return (self.state, *(self.steps[s] for s in STEPS))  # type: ignore[return-value]


@dataclass
class Report:
    machine_version: str
    live: int = 0
    groups: int = 0
    stranded: list[tuple[Group, list[str]]] = field(default_factory=list)
    order_ids: dict[Combo, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.stranded

    @property
    def stranded_orders(self) -> int:
        return sum(group.count for group, _ in self.stranded)

    def summary(self) -> str:
        if self.ok:
            return (
                f"ok: machine {self.machine_version} can drive all {self.live} live orders "
                f"({self.groups} groups of state and step states)"
            )
        return (
            f"would strand {self.stranded_orders} of {self.live} live orders "
            f"under machine {self.machine_version}"
        )

    def by_state(self) -> dict[str, list[dict[str, Any]]]:
        grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for group, why in self.stranded:
            grouped[group.state].append(
                {
                    "steps": group.steps,
                    "machine_version": group.machine_version,
                    "count": group.count,
                    "reasons": why,
                    "orders": self.order_ids.get(group.combo, []),
                }
            )
        return dict(grouped)

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "machine_version": self.machine_version,
            "live_orders": self.live,
            "groups": self.groups,
            "stranded_orders": self.stranded_orders,
            "stranded": self.by_state(),
        }

    def lines(self) -> list[str]:
        out = [self.summary()]
        for state, entries in self.by_state().items():
            out.append(f"state {state}: {sum(e['count'] for e in entries)} orders")
            for entry in entries:
                steps = " ".join(f"{k}={v}" for k, v in entry["steps"].items())
                out.append(
                    f"  {entry['count']} with {steps} (written by machine "
                    f"{entry['machine_version']}): {'; '.join(entry['reasons'])}"
                )
                out.extend(f"    {oid}" for oid in entry["orders"])
        return out


def live_groups(engine: Engine, *, terminal: Iterable[str]) -> list[Group]:
    """Every order not in a `terminal` state, counted per (state, step states, version):
    one grouped query, so 100,000 orders come back as a handful of rows."""
    keys = [orders.c.state, *(orders.c[f"{s}_state"] for s in STEPS), orders.c.machine_version]
    query = select(*keys, func.count()).where(orders.c.state.not_in(list(terminal))).group_by(*keys)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return [
        Group(row[0], dict(zip(STEPS, row[1:4], strict=True)), row[4], int(row[5])) for row in rows
    ]


def check(engine: Engine, tables: Tables | None = None, *, with_ids: int = 0) -> Report:
    """Check every live order against `tables` (default: the installed machine). With
    `with_ids`, also list up to that many ids per stranded group (one more query)."""
    tables = tables or Tables.installed()
    groups = live_groups(engine, terminal=tables.order_terminal)
    report = Report(machine_version=tables.version, groups=len(groups))
    for group in groups:
        report.live += group.count
        why = tables.reasons(group.state, group.steps)
        if why:
            report.stranded.append((group, why))
    if with_ids and report.stranded:
        report.order_ids = _ids(engine, {g.combo for g, _ in report.stranded}, with_ids)
    return report


def _ids(engine: Engine, combos: set[Combo], limit: int) -> dict[Combo, list[str]]:
    columns = [orders.c.state, *(orders.c[f"{s}_state"] for s in STEPS)]
    query = (
        select(orders.c.id, *columns)
        .where(tuple_(*columns).in_(sorted(combos)))
        .order_by(orders.c.created_at)
    )
    found: dict[Combo, list[str]] = defaultdict(list)
    with engine.connect() as conn:
        for oid, *combo in conn.execute(query):
            ids = found[(combo[0], combo[1], combo[2], combo[3])]
            if len(ids) < limit:
                ids.append(str(oid))
    return dict(found)


def undrivable(engine: Engine, tables: Tables | None = None) -> frozenset[Combo]:
    """The (order state, payment, inventory, shipping) combinations the machine cannot drive."""
    return frozenset(group.combo for group, _ in check(engine, tables).stranded)


def guard(store: Store) -> frozenset[Combo]:
    """Start-up check of `serve` and `worker`: log once, set the metric, and hand the
    undrivable combinations to the store, whose sweep query then skips those orders."""
    try:
        report = check(store.engine)
    except SQLAlchemyError as exc:  # start anyway: the sweep still refuses corrupt rows
        log.warning("could not check the live orders at start (%s): sweeping as usual", exc)
        return frozenset()
    UNDRIVABLE.set(report.stranded_orders)
    combos = frozenset(group.combo for group, _ in report.stranded)
    store.undrivable = combos
    if report.stranded:
        detail = "; ".join(
            f"{group.count} in {group.state} ({', '.join(why)})" for group, why in report.stranded
        )
        log.error(
            "%s: the sweep skips them, never driving or rewriting them (see "
            "`order-saga check-upgrade` and the README's state migrations): %s",
            report.summary(),
            detail,
        )
    return combos
