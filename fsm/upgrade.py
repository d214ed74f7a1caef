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
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Gauge
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from fsm import queries
from fsm.machine import OrderState as S
from fsm.machine import StepState
from fsm.models import STATE_COLUMN
from fsm.store import Store
from fsm.version import Tables

__all__ = ["Combo", "Group", "Report", "Tables", "check", "guard", "live_groups", "undrivable"]

log = logging.getLogger("order_saga.upgrade")

UNDRIVABLE = Gauge(
    "order_saga_undrivable_orders",
    "Live orders the installed machine cannot drive (skipped by the sweep), found at start",
    multiprocess_mode="max",  # each `serve --workers` process finds the same at its start
)

STEPS = tuple(scope for scope in STATE_COLUMN if scope != "order")  # the machine's order
Combo = tuple[str, ...]  # (order state, *each step's state in STEPS order)


@dataclass(frozen=True)
class Group:
    """Live orders sharing one state, one set of step states and one machine version."""

    state: str
    steps: dict[str, str]
    machine_version: str
    count: int

    @property
    def combo(self) -> Combo:
        return (self.state, *(self.steps[s] for s in STEPS))


@dataclass
class Report:
    machine_version: str
    live: int = 0
    groups: int = 0
    stranded: list[tuple[Group, list[str]]] = field(default_factory=list)
    order_ids: dict[Combo, list[str]] = field(default_factory=dict)
    # What a step added to the registry means for live orders (drivable, but worth knowing).
    notes: list[str] = field(default_factory=list)

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
            "notes": self.notes,
        }

    def lines(self) -> list[str]:
        out = [self.summary(), *(f"note: {note}" for note in self.notes)]
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
    return [
        Group(combo[0], dict(zip(STEPS, combo[1:], strict=True)), version, count)
        for combo, version, count in queries.live_state_groups(engine, terminal=terminal)
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
        report.notes.extend(_added_steps(group, tables.version))
    if with_ids and report.stranded:
        report.order_ids = queries.ids_by_states(
            engine, {g.combo for g, _ in report.stranded}, with_ids
        )
    return report


# Order states in which the steps have not been decided yet: a pending step there is run.
_BEFORE_THE_JOIN = frozenset({S.PENDING, S.PRODUCT_REQUESTED, S.STEPS_RUNNING})


def _added_steps(group: Group, version: str) -> list[str]:
    """A step still `pending` in an order past the join was added after the order ran its
    steps (the migration's default for the new column): it is never run, and not undone
    (only a step that may have taken effect is compensated), so the order is not
    resurrected. One written by another machine before the join will run it."""
    pending = [step for step, state in group.steps.items() if state == StepState.PENDING]
    if not pending:
        return []
    if group.state not in _BEFORE_THE_JOIN:
        return [
            f"{group.count} live orders in {group.state} have {', '.join(pending)} pending "
            f"(added after they ran their steps): never run, never undone for them"
        ]
    if group.machine_version != version and group.state == S.STEPS_RUNNING:
        return [
            f"{group.count} live orders in steps_running, written by machine "
            f"{group.machine_version}, have {', '.join(pending)} pending: resumed, they run it"
        ]
    return []


def undrivable(engine: Engine, tables: Tables | None = None) -> frozenset[Combo]:
    """The (order state, *step states) combinations the machine cannot drive."""
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
