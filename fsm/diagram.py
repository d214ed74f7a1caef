"""State diagram export (mermaid, dot, svg, png) drawn from the tables in `fsm.machine`, so
the picture cannot drift from what the executor runs: nothing here is drawn by hand. Given one
order's transition log, its path and current state(s) are highlighted. No SQL of its own
(`render_for_order` reads through a Store); svg/png shell out to Graphviz's `dot`.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol, get_args

import graphviz

from fsm.machine import (
    AUDIT_SCOPE,
    TERMINAL_ORDER_STATES,
    Edge,
    OrderState,
    OrderTrigger,
    StepTrigger,
)
from fsm.machine import edges as declared_edges
from fsm.registry import STEP, STEP_NAMES

if TYPE_CHECKING:
    from fsm.models import Transition
    from fsm.store import Store

__all__ = [
    "CONTENT_TYPES",
    "FORMATS",
    "Format",
    "GraphvizMissing",
    "Highlight",
    "Overlay",
    "UnknownFormat",
    "edge_kind",
    "highlighted",
    "node_id",
    "render",
    "render_dot",
    "render_for_order",
    "to_dot",
    "to_mermaid",
]

Format = Literal["mermaid", "dot", "svg", "png"]
FORMATS: tuple[Format, ...] = get_args(Format)
CONTENT_TYPES: Mapping[str, str] = {
    "mermaid": "text/vnd.mermaid; charset=utf-8",
    "dot": "text/vnd.graphviz; charset=utf-8",
    "svg": "image/svg+xml",
    "png": "image/png",
}

StateKey = tuple[str, str]  # (scope, state)
EdgeKey = tuple[str, str, str, str]  # (scope, trigger, from_state, to_state)
_Attrs = dict[str, str | float]  # dot attributes


class UnknownFormat(ValueError):
    def __init__(self, fmt: str) -> None:
        super().__init__(f"unknown diagram format {fmt!r}: use one of {', '.join(FORMATS)}")


class GraphvizMissing(RuntimeError):
    def __init__(self) -> None:
        super().__init__(
            "Graphviz is not installed: apt-get install graphviz (or brew install graphviz)"
        )


# Presentation only: which declared triggers are the happy path and which are a failure;
# everything else (compensate, cancel, park, retry...) undoes or parks work.
HAPPY_TRIGGERS = frozenset(
    {
        OrderTrigger.REQUEST_PRODUCT,
        OrderTrigger.PRODUCT_FOUND,
        OrderTrigger.ALL_SUCCEEDED,
        StepTrigger.REQUEST,
        StepTrigger.SUCCEED,
    }
)
FAILURE_TRIGGERS = frozenset(
    {
        OrderTrigger.PRODUCT_MISSING,
        OrderTrigger.PRODUCT_UNAVAILABLE,
        StepTrigger.FAIL,
        StepTrigger.EXPIRE,
    }
)
_COLOR = {"happy": "#2e7d32", "failure": "#c62828", "compensation": "#e65100"}
_DIM = "#b8b8b8"
_VISITED, _CURRENT = "#bbdefb", "#ffd54f"
# Where an order can come to rest, tinted by outcome (whole-machine picture only).
_OUTCOMES = {
    "success": ("#e8f5e9", "#2e7d32", ["completed"]),
    "failure": ("#ffebee", "#c62828", ["rejected", "failed"]),
    "closed": ("#eeeeee", "#616161", ["cancelled", "resolved"]),
    "attention": ("#fff3e0", "#e65100", ["needs_attention"]),
}
_OUTCOME_FILL = {state: fill for fill, _, states in _OUTCOMES.values() for state in states}
# One order's picture: where it rests now is filled by outcome, strongly, so a failed order
# never looks like a completed one (a running order keeps the yellow "current").
_RESTING = {"success": "#81c784", "failure": "#e57373", "closed": "#bdbdbd", "attention": "#ffb74d"}
_CURRENT_FILL = {s: _RESTING[name] for name, (_, _, states) in _OUTCOMES.items() for s in states}
_STEP_FILL = {
    "succeeded": _RESTING["success"],
    "failed": _RESTING["failure"],
    "expired": _RESTING["failure"],
    "compensating": _RESTING["attention"],
    "compensated": _RESTING["closed"],
}
_STEPS = "steps_running"
_MIDDLE = STEP_NAMES[len(STEP_NAMES) // 2]


def edge_kind(trigger: str) -> Literal["happy", "failure", "compensation"]:
    if trigger in HAPPY_TRIGGERS:
        return "happy"
    return "failure" if trigger in FAILURE_TRIGGERS else "compensation"


def node_id(scope: str, state: str) -> str:
    """The id a state has in dot and mermaid: order states bare, step states prefixed."""
    return state if scope == "order" else f"{scope}_{state}"


class Overlay(Protocol):
    """Extra dot attributes per state and edge, drawn over the plain machine (the heatmap
    of `fsm.heatmap` labels and tints them with the traffic of the log)."""

    def state(self, scope: str, state: str) -> dict[str, str | float]: ...
    def edge(self, edge: Edge) -> dict[str, str | float]: ...


class Highlight(NamedTuple):
    """What one order's log lights up: every state it entered or left, every edge it took,
    and where each machine stands now (the last `to_state` per scope)."""

    states: frozenset[StateKey]
    edges: frozenset[EdgeKey]
    current: frozenset[StateKey]


def highlighted(history: Iterable[Transition]) -> Highlight:
    states: set[StateKey] = set()
    taken: set[EdgeKey] = set()
    last: dict[str, str] = {}
    for row in sorted(history, key=lambda r: r.seq):
        if row.scope == AUDIT_SCOPE:
            continue  # who did what: not a move of the machine
        states |= {(row.scope, row.from_state), (row.scope, row.to_state)}
        taken.add((row.scope, row.trigger, row.from_state, row.to_state))
        last[row.scope] = row.to_state
    last.setdefault("order", OrderState.PENDING)  # a fresh order has no log yet
    return Highlight(frozenset(states), frozenset(taken), frozenset(last.items()))


def _seqs(history: Iterable[Transition]) -> dict[EdgeKey, list[int]]:
    seqs: dict[EdgeKey, list[int]] = defaultdict(list)
    for row in sorted(history, key=lambda r: r.seq):
        seqs[(row.scope, row.trigger, row.from_state, row.to_state)].append(row.seq)
    return seqs


def _label(edge: Edge, seqs: Mapping[EdgeKey, list[int]]) -> str:
    taken = seqs.get((edge.scope, edge.trigger, edge.source, edge.dest))
    return f"{edge.trigger} ({', '.join(map(str, taken))})" if taken else edge.trigger


def _split() -> tuple[list[Edge], dict[str, list[Edge]]]:
    order: list[Edge] = []
    steps: dict[str, list[Edge]] = {step: [] for step in STEP_NAMES}
    for edge in declared_edges():
        (order if edge.scope == "order" else steps[edge.scope]).append(edge)
    return order, steps


def _states(edge_list: Iterable[Edge]) -> list[str]:
    return list(dict.fromkeys(s for e in edge_list for s in (e.source, e.dest)))


# -- dot ---------------------------------------------------------------------------------


def _q(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _attrs(**attrs: str | float) -> str:
    return "[" + ", ".join(f"{k}={_q(str(v))}" for k, v in attrs.items()) + "]"


def _dot_state(scope: str, state: str, hl: Highlight | None) -> _Attrs:
    attrs: _Attrs = {"label": state}
    if scope == "order" and state in TERMINAL_ORDER_STATES:
        attrs["peripheries"] = 2
    if hl is None:
        attrs["fillcolor"] = _OUTCOME_FILL.get(state, "white") if scope == "order" else "white"
    elif (scope, state) in hl.current:
        outcome = (_CURRENT_FILL if scope == "order" else _STEP_FILL).get(state, _CURRENT)
        attrs.update(
            {
                "fillcolor": outcome,
                "penwidth": 3,
                "fontname": "Helvetica-Bold",
                "class": "visited current",
            }
        )
    elif (scope, state) in hl.states:
        attrs.update({"fillcolor": _VISITED, "class": "visited"})
    else:
        attrs.update(fillcolor="white", color=_DIM, fontcolor="#888888")
    return attrs


def _dot_edge(
    edge: Edge,
    hl: Highlight | None,
    seqs: Mapping[EdgeKey, list[int]],
    ends: tuple[str, str] | None,
    overlay: Overlay | None = None,
) -> str:
    kind = edge_kind(edge.trigger)
    attrs: _Attrs = {"label": _label(edge, seqs), "color": _COLOR[kind], "fontcolor": _COLOR[kind]}
    if kind == "compensation":
        attrs["style"] = "dashed"
    if kind == "happy":  # keep the happy path a straight spine
        attrs["weight"] = 8
    if hl is not None and (edge.scope, edge.trigger, edge.source, edge.dest) in hl.edges:
        attrs.update({"penwidth": 3, "fontname": "Helvetica-Bold", "class": f"taken {kind}"})
    elif hl is not None:
        attrs.update(color=_DIM, fontcolor="#999999")
    if overlay is not None:
        attrs.update(overlay.edge(edge))
    tail, head = node_id(edge.scope, edge.source), node_id(edge.scope, edge.dest)
    if ends is not None and edge.source == _STEPS:  # leave the steps box from its bottom
        tail, attrs["ltail"] = node_id(_MIDDLE, ends[1]), f"cluster_{_STEPS}"
    if ends is not None and edge.dest == _STEPS:  # enter it at the top
        head, attrs["lhead"] = node_id(_MIDDLE, ends[0]), f"cluster_{_STEPS}"
    return f"  {_q(tail)} -> {_q(head)} {_attrs(**attrs)};"


def _legend(hl: Highlight | None) -> str:
    parts = [
        f'<font color="{_COLOR["happy"]}">━ happy path</font>',
        f'<font color="{_COLOR["failure"]}">━ failure</font>',
        f'<font color="{_COLOR["compensation"]}">╌ compensation, cancel, park</font>',
        "double border: terminal",
    ]
    if hl is not None:
        parts += [
            "bold: taken by this order (n = log seq)",
            "filled: where it is now (green done, red failed, orange parked, yellow running)",
            "blue: visited",
        ]
    return "<" + " &nbsp; · &nbsp; ".join(parts) + ">"


_GRAPH: _Attrs = {
    "rankdir": "TB",
    "ordering": "out",
    "compound": "true",
    "fontsize": 10,
    "fontname": "Helvetica",
    "nodesep": 0.3,
    "ranksep": 0.4,
    "labelloc": "b",
}
_NODE: _Attrs = {
    "shape": "box",
    "style": "rounded,filled",
    "fontname": "Helvetica",
    "fontsize": 11,
    "height": 0.3,
}
_COLUMN: _Attrs = {
    "style": "rounded,filled",
    "fillcolor": "#fafafa",
    "color": "#999999",
    "penwidth": 1,
    "fontsize": 11,
    "fontname": "Helvetica-Bold",
    "class": "",
}  # clusters inherit attributes: undo the steps box's
_BOX_LABEL = (
    f"{_STEPS}: payment, inventory and shipping run concurrently, one step machine"
    " each;\ntheir compensate edges run later, while the order is compensating or"
    " cancelling"
)


def _steps_box(hl: Highlight | None) -> _Attrs:
    box: _Attrs = {"label": _BOX_LABEL, "style": "rounded", "color": "#555555"}
    if hl is not None and ("order", _STEPS) in hl.current:
        box.update(
            {
                "style": "rounded,filled,bold",
                "fillcolor": "#fff8dc",
                "penwidth": 3,
                "class": "visited current",
            }
        )
    elif hl is not None and ("order", _STEPS) in hl.states:
        box.update({"style": "rounded,filled", "fillcolor": "#f3f8fd", "class": "visited"})
    return box


def to_dot(history: Sequence[Transition] | None = None, overlay: Overlay | None = None) -> str:
    hl = None if history is None else highlighted(history)

    def state_attrs(scope: str, state: str) -> _Attrs:
        attrs = _dot_state(scope, state, hl)
        return attrs if overlay is None else {**attrs, **overlay.state(scope, state)}

    seqs = {} if history is None else _seqs(history)
    order, steps = _split()
    lines = [
        "digraph order_saga {",
        f"  graph {_attrs(**_GRAPH)};",
        f"  graph [label={_legend(hl)}];",
        f"  node {_attrs(**_NODE)};",
        f"  edge {_attrs(fontname='Helvetica', fontsize=9, arrowsize=0.7)};",
        f"  start {_attrs(shape='point', width=0.15, label='')};",
        f"  start -> {_q(OrderState.PENDING)};",
    ]
    lines += [
        f"  {_q(state)} {_attrs(**state_attrs('order', state))};"
        for state in _states(order)
        if state != _STEPS
    ]
    lines.append(f"  subgraph {_q('cluster_' + _STEPS)} {{")
    lines.append(f"    graph {_attrs(**_steps_box(hl))};")
    # dot lays sibling clusters out right to left: emit them reversed so columns read
    # payment, inventory, shipping.
    for step, step_edges in reversed(steps.items()):
        label = f"{step} ({STEP[step].forward} / {STEP[step].undo})"
        lines.append(f"    subgraph {_q('cluster_' + step)} {{")
        lines.append(f"      graph {_attrs(label=label, **_COLUMN)};")
        lines += [
            f"      {_q(node_id(step, state))} {_attrs(**state_attrs(step, state))};"
            for state in _states(step_edges)
        ]
        lines.append("    }")
    lines.append("  }")
    middle = _states(steps[_MIDDLE])  # order edges attach to the middle column's ends
    lines += [_dot_edge(edge, hl, seqs, (middle[0], middle[-1]), overlay) for edge in order]
    lines += [_dot_edge(edge, hl, seqs, None, overlay) for es in steps.values() for edge in es]
    lines.append("}")
    return "\n".join(lines) + "\n"


# -- mermaid -----------------------------------------------------------------------------


def to_mermaid(history: Sequence[Transition] | None = None) -> str:
    hl = None if history is None else highlighted(history)
    seqs = {} if history is None else _seqs(history)
    order, steps = _split()
    lines = [
        "stateDiagram-v2",
        "    %% generated from fsm/machine.py by fsm/diagram.py: do not edit by hand",
        f"    [*] --> {OrderState.PENDING}",
    ]
    lines += [f"    {e.source} --> {e.dest}: {_label(e, seqs)}" for e in order]
    lines.append(f"    state {_STEPS} {{")
    for i, (step, step_edges) in enumerate(steps.items()):
        if i:
            lines.append("        --")  # concurrent regions: one step machine each
        lines.append(f"        state {step} {{")
        lines += [f'            state "{s}" as {node_id(step, s)}' for s in _states(step_edges)]
        lines.append(f"            [*] --> {node_id(step, step_edges[0].source)}")
        lines += [
            f"            {node_id(step, e.source)} --> {node_id(step, e.dest)}: {_label(e, seqs)}"
            for e in step_edges
        ]
        lines.append("        }")
    lines.append("    }")
    classes: dict[str, list[str]] = {}
    if hl is None:
        for name, (fill, stroke, states) in _OUTCOMES.items():
            lines.append(f"    classDef {name} fill:{fill},stroke:{stroke}")
            classes[name] = states
    else:
        lines += [
            f"    classDef visited fill:{_VISITED},stroke:#1565c0",
            f"    classDef current fill:{_CURRENT},stroke:#000,stroke-width:3px,font-weight:bold",
            "    classDef untouched fill:#fff,stroke:#bbb,color:#999",
        ]
        every = {("order", s) for s in _states(order)}
        every |= {(step, s) for step, step_edges in steps.items() for s in _states(step_edges)}
        for name, keys in (
            ("visited", hl.states - hl.current),
            ("current", hl.current),
            ("untouched", every - hl.states - hl.current),
        ):
            classes[name] = sorted(node_id(scope, state) for scope, state in keys)
    lines += [f"    class {','.join(ids)} {name}" for name, ids in classes.items() if ids]
    return "\n".join(lines) + "\n"


# -- entry points ------------------------------------------------------------------------


def _graphviz(dot: str, fmt: str) -> bytes:
    try:
        out: bytes = graphviz.Source(dot).pipe(format=fmt, quiet=True)
    except graphviz.ExecutableNotFound as exc:
        raise GraphvizMissing() from exc
    return out


def render_dot(dot: str, fmt: str) -> bytes:
    """Lay out a dot document made here (e.g. with an Overlay) as svg or png."""
    return _graphviz(dot, fmt)


@lru_cache(maxsize=len(FORMATS))
def _render_machine(fmt: str) -> bytes:
    return _render(fmt, None)


def _render(fmt: str, history: Sequence[Transition] | None) -> bytes:
    if fmt == "mermaid":
        return to_mermaid(history).encode()
    if fmt == "dot":
        return to_dot(history).encode()
    return _graphviz(to_dot(history), fmt)


def render(fmt: str, history: Sequence[Transition] | None = None) -> bytes:
    """The whole machine in `fmt`; with one order's log, its path and current state(s)
    highlighted. Raises UnknownFormat, or GraphvizMissing for svg/png without `dot`."""
    if fmt not in FORMATS:
        raise UnknownFormat(fmt)
    return _render_machine(fmt) if history is None else _render(fmt, history)


def render_for_order(store: Store, order_id: uuid.UUID, fmt: str) -> bytes:
    """`render` with the order's persisted log; raises OrderNotFound for an unknown id."""
    if fmt not in FORMATS:
        raise UnknownFormat(fmt)
    store.get(order_id)
    return render(fmt, store.history(order_id))
