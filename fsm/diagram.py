"""State diagram export (mermaid, dot, svg, png) drawn from the tables in `fsm.machine`, so
the picture cannot drift from what the executor runs. Given one order's transition log, its
path and current state(s) are highlighted. No SQL here; svg/png only shell out to Graphviz.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Literal, NamedTuple, get_args

import graphviz

from fsm.machine import TERMINAL_ORDER_STATES, Edge, OrderState, OrderTrigger, Step, StepTrigger
from fsm.machine import edges as declared_edges

if TYPE_CHECKING:
    from fsm.models import Transition
    from fsm.store import Store

__all__ = [
    "CONTENT_TYPES",
    "FORMATS",
    "Format",
    "GraphvizMissing",
    "Highlight",
    "UnknownFormat",
    "edge_kind",
    "highlighted",
    "node_id",
    "render",
    "render_for_order",
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
HAPPY_TRIGGERS = frozenset({OrderTrigger.REQUEST_PRODUCT, OrderTrigger.PRODUCT_FOUND,
                            OrderTrigger.ALL_SUCCEEDED, StepTrigger.REQUEST, StepTrigger.SUCCEED})
FAILURE_TRIGGERS = frozenset({OrderTrigger.PRODUCT_MISSING, OrderTrigger.PRODUCT_UNAVAILABLE,
                              StepTrigger.FAIL, StepTrigger.EXPIRE})
_COLOR = {"happy": "#2e7d32", "failure": "#c62828", "compensation": "#e65100"}
_DIM = "#b8b8b8"
_VISITED, _CURRENT = "#dcebfa", "#ffd54f"
_OUTCOME_FILL = {"completed": "#e8f5e9", "rejected": "#ffebee", "failed": "#ffebee",
                 "cancelled": "#eeeeee", "needs_attention": "#fff3e0"}
_STEPS = "steps_running"
_MIDDLE = list(Step)[len(Step) // 2]  # the column order edges attach to in dot


def edge_kind(trigger: str) -> Literal["happy", "failure", "compensation"]:
    if trigger in HAPPY_TRIGGERS:
        return "happy"
    return "failure" if trigger in FAILURE_TRIGGERS else "compensation"


def node_id(scope: str, state: str) -> str:
    """The id a state has in dot and mermaid: order states bare, step states prefixed."""
    return state if scope == "order" else f"{scope}_{state}"


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
    steps: dict[str, list[Edge]] = {step: [] for step in Step}
    for edge in declared_edges():
        (order if edge.scope == "order" else steps[edge.scope]).append(edge)
    return order, steps


def _states(edge_list: Iterable[Edge]) -> list[str]:
    return list(dict.fromkeys(s for e in edge_list for s in (e.source, e.dest)))


# -- dot ---------------------------------------------------------------------------------


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _attrs(**attrs: str | float) -> str:
    return "[" + ", ".join(f"{k}={_q(str(v))}" for k, v in attrs.items()) + "]"


def _dot_state(scope: str, state: str, hl: Highlight | None) -> dict[str, str | float]:
    attrs: dict[str, str | float] = {"label": state}
    if scope == "order" and state in TERMINAL_ORDER_STATES:
        attrs["peripheries"] = 2
    if hl is None:
        attrs["fillcolor"] = _OUTCOME_FILL.get(state, "white") if scope == "order" else "white"
    elif (scope, state) in hl.current:
        attrs.update(fillcolor=_CURRENT, penwidth=3, fontname="Helvetica-Bold",
                     **{"class": "visited current"})
    elif (scope, state) in hl.states:
        attrs.update(fillcolor=_VISITED, **{"class": "visited"})
    else:
        attrs.update(fillcolor="white", color=_DIM, fontcolor="#888888")
    return attrs


def _dot_edge(edge: Edge, hl: Highlight | None, seqs: Mapping[EdgeKey, list[int]]) -> str:
    kind = edge_kind(edge.trigger)
    attrs: dict[str, str | float] = {"label": _label(edge, seqs), "color": _COLOR[kind],
                                     "fontcolor": _COLOR[kind]}
    if kind == "compensation":
        attrs["style"] = "dashed"
    key = (edge.scope, edge.trigger, edge.source, edge.dest)
    if hl is not None and key in hl.edges:
        attrs.update(penwidth=3, fontname="Helvetica-Bold", **{"class": f"taken {kind}"})
    elif hl is not None:
        attrs.update(color=_DIM, fontcolor="#999999")
    tail, head = node_id(edge.scope, edge.source), node_id(edge.scope, edge.dest)
    if edge.source == _STEPS and edge.scope == "order":  # leave the steps box from its bottom
        tail, attrs["ltail"] = f"{_MIDDLE}_compensated", f"cluster_{_STEPS}"
    if edge.dest == _STEPS and edge.scope == "order":  # enter it at the top
        head, attrs["lhead"] = f"{_MIDDLE}_pending", f"cluster_{_STEPS}"
    return f"  {_q(tail)} -> {_q(head)} {_attrs(**attrs)};"


def _legend(hl: Highlight | None) -> str:
    parts = [f'<font color="{_COLOR["happy"]}">━ happy path</font>',
             f'<font color="{_COLOR["failure"]}">━ failure</font>',
             f'<font color="{_COLOR["compensation"]}">╌ compensation, cancel, park</font>',
             "double border: terminal"]
    if hl is not None:
        parts += ["bold: taken by this order (n = log seq)", "yellow: current state",
                  "blue: visited"]
    return "<" + " &nbsp; · &nbsp; ".join(parts) + ">"


def to_dot(history: Sequence[Transition] | None = None) -> str:
    hl = None if history is None else highlighted(history)
    seqs = {} if history is None else _seqs(history)
    order, steps = _split()
    lines = [
        "digraph order_saga {",
        f"  graph {_attrs(rankdir='TB', compound='true', fontname='Helvetica', fontsize=10, nodesep=0.3, ranksep=0.4, labelloc='b')};",  # noqa: E501
        f"  graph [label={_legend(hl)}];",
        f"  node {_attrs(shape='box', style='rounded,filled', fontname='Helvetica', fontsize=11, height=0.3)};",  # noqa: E501
        f"  edge {_attrs(fontname='Helvetica', fontsize=9, arrowsize=0.7)};",
        f"  start {_attrs(shape='point', width=0.15, label='')};",
        f"  start -> {_q(OrderState.PENDING)};",
    ]
    for state in _states(order):
        if state != _STEPS:
            lines.append(f"  {_q(state)} {_attrs(**_dot_state('order', state, hl))};")
    box: dict[str, str | float] = {
        "label": f"{_STEPS}: payment, inventory and shipping run concurrently, one step machine"
        " each;\ntheir compensate edges run later, while the order is compensating or cancelling",
        "style": "rounded", "color": "#555555", "fontsize": 10}
    if hl is not None and ("order", _STEPS) in hl.current:
        box.update(style="rounded,filled,bold", fillcolor="#fff8dc", penwidth=3,
                   **{"class": "visited current"})
    elif hl is not None and ("order", _STEPS) in hl.states:
        box.update(style="rounded,filled", fillcolor="#f3f8fd", **{"class": "visited"})
    lines.append(f"  subgraph {_q('cluster_' + _STEPS)} {{")
    lines.append(f"    graph {_attrs(**box)};")
    for step, step_edges in steps.items():
        fwd, comp = Step(step).forward_action, Step(step).compensation_action
        lines.append(f"    subgraph {_q('cluster_' + step)} {{")
        lines.append(f"      graph {_attrs(label=f'{step} ({fwd} / {comp})', style='rounded,filled', fillcolor='#fafafa', color='#999999', fontsize=11, fontname='Helvetica-Bold')};")  # noqa: E501
        for state in _states(step_edges):
            attrs = _dot_state(step, state, hl)
            lines.append(f"      {_q(node_id(step, state))} {_attrs(**attrs)};")
        lines.append("    }")
    lines.append("  }")
    lines += [_dot_edge(edge, hl, seqs) for edge in order]
    lines += [_dot_edge(edge, hl, seqs) for step_edges in steps.values() for edge in step_edges]
    lines.append("}")
    return "\n".join(lines) + "\n"


# -- mermaid -----------------------------------------------------------------------------


def to_mermaid(history: Sequence[Transition] | None = None) -> str:
    hl = None if history is None else highlighted(history)
    seqs = {} if history is None else _seqs(history)
    order, steps = _split()
    lines = ["stateDiagram-v2",
             "    %% generated from fsm/machine.py by fsm/diagram.py: do not edit by hand",
             f"    [*] --> {OrderState.PENDING}"]
    lines += [f"    {e.source} --> {e.dest}: {_label(e, seqs)}" for e in order]
    lines += [f"    {s} --> [*]" for s in _states(order) if s in TERMINAL_ORDER_STATES]
    lines.append(f"    state {_STEPS} {{")
    for i, (step, step_edges) in enumerate(steps.items()):
        if i:
            lines.append("        --")
        lines.append(f"        state {step} {{")
        lines += [f'            state "{s}" as {node_id(step, s)}' for s in _states(step_edges)]
        lines.append(f"            [*] --> {node_id(step, step_edges[0].source)}")
        lines += [f"            {node_id(step, e.source)} --> {node_id(step, e.dest)}:"
                  f" {_label(e, seqs)}" for e in step_edges]
        lines.append("        }")
    lines.append("    }")
    if hl is None:
        lines += [f"    classDef {state} fill:{fill}" for state, fill in _OUTCOME_FILL.items()]
        lines += [f"    class {state} {state}" for state in _OUTCOME_FILL]
    else:
        lines += [f"    classDef visited fill:{_VISITED},stroke:#1565c0",
                  f"    classDef current fill:{_CURRENT},stroke:#000,stroke-width:3px,"
                  "font-weight:bold"]
        for name, keys in (("visited", hl.states - hl.current), ("current", hl.current)):
            ids = sorted(node_id(scope, state) for scope, state in keys)
            if ids:
                lines.append(f"    class {','.join(ids)} {name}")
    return "\n".join(lines) + "\n"


# -- entry points ------------------------------------------------------------------------


def _graphviz(dot: str, fmt: str) -> bytes:
    try:
        out: bytes = graphviz.Source(dot).pipe(format=fmt, quiet=True)
    except graphviz.ExecutableNotFound as exc:
        raise GraphvizMissing() from exc
    return out


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
