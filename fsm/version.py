"""Which machine is this? `Tables`, one version of both machines as plain data, and its
hash `MACHINE_VERSION`, which live orders and transitions record (issue 10), so a deploy can
tell which orders were written by which tables; and what such a version can drive.

Pure, no I/O: `fsm.upgrade` runs the check against the database. The hash is sorted
canonical JSON, so reordering rows changes nothing and renaming a state, trigger or edge
changes it.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from fsm.machine import (
    ORDER_TRANSITIONS,
    STEP_TRANSITIONS,
    TERMINAL_ORDER_STATES,
    OrderState,
    StepState,
)
from fsm.registry import STEPS

__all__ = ["MACHINE_VERSION", "Tables", "flat_edges", "version_of"]

EdgeTable = list[tuple[Any, Any, Any]]
StepKey = tuple[str, str, str, str]  # a registry row as data: name, service, forward, undo


def flat_edges(table: EdgeTable) -> list[tuple[str, str, str]]:
    """(trigger, source, dest) per source, sorted: the table with its lists expanded."""
    return sorted(
        (str(trigger), str(source), str(dest))
        for trigger, sources, dest in table
        for source in (sources if isinstance(sources, list) else [sources])
    )


def version_of(
    *,
    order_states: Iterable[str],
    order_terminal: Iterable[str],
    order_edges: EdgeTable,
    step_states: Iterable[str],
    step_edges: EdgeTable,
    steps: Iterable[StepKey],
) -> str:
    """sha256 (first 12 hex digits) of both machines' states, terminal states and edges,
    and of the steps (name, service, forward and undo actions) in their order: adding,
    removing, renaming or reordering a step is a new machine."""
    canonical = {
        "order": {
            "states": sorted(map(str, order_states)),
            "terminal": sorted(map(str, order_terminal)),
            "edges": flat_edges(order_edges),
        },
        "step": {"states": sorted(map(str, step_states)), "edges": flat_edges(step_edges)},
        "steps": [list(step) for step in steps],
    }
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Tables:
    """One version of both machines as plain data: what the check runs against."""

    order_states: frozenset[str]
    order_terminal: frozenset[str]
    order_edges: tuple[tuple[str, str, str], ...]  # (trigger, source, dest)
    step_states: frozenset[str]
    step_edges: tuple[tuple[str, str, str], ...]
    steps: tuple[StepKey, ...]  # the registry's rows, in order

    @classmethod
    def installed(cls) -> Tables:
        return cls(
            order_states=frozenset(s.value for s in OrderState),
            order_terminal=frozenset(s.value for s in TERMINAL_ORDER_STATES),
            order_edges=tuple(flat_edges(ORDER_TRANSITIONS)),
            step_states=frozenset(s.value for s in StepState),
            step_edges=tuple(flat_edges(STEP_TRANSITIONS)),
            steps=tuple((r.name, r.service, r.forward, r.undo) for r in STEPS),
        )

    @property
    def version(self) -> str:
        return version_of(
            order_states=self.order_states,
            order_terminal=self.order_terminal,
            order_edges=list(self.order_edges),
            step_states=self.step_states,
            step_edges=list(self.step_edges),
            steps=self.steps,
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


MACHINE_VERSION = Tables.installed().version
