"""The heatmap of the whole machine: `fsm.queries.heat` (counts, p50/p95 time spent, orders
there now, from the transition log) drawn on the state diagram itself. Each state is
labelled with its figures and tinted by its p95 time; each edge is labelled with how many
orders took it and drawn thicker the more it carries. No SQL or drawing rules of its own
beyond that: the layout is `fsm.diagram`'s.
"""

from __future__ import annotations

import math

from fsm.diagram import render_dot, to_dot
from fsm.machine import Edge, OrderState, StepState, is_terminal
from fsm.queries import Heat, StateHeat

_HOT = (198, 40, 40)  # the slowest state's tint; the rest is scaled towards white
# Time spent in a state is slowness only where work is pending: a live order state, a
# step waiting for its call. A completed order (or a succeeded step) that stays there is
# done, not slow: never tinted, and not the yardstick of the others.
_STEP_WORKING = frozenset(
    {StepState.PENDING.value, StepState.REQUESTED.value, StepState.COMPENSATING.value}
)


def working(scope: str, state: str) -> bool:
    if scope == "order":
        return state in {s.value for s in OrderState} and not is_terminal(state)
    return state in _STEP_WORKING


def duration(seconds: float | None) -> str:
    """A short human duration: 850ms, 12.3s, 4m05s, 2h10m."""
    if seconds is None:
        return "–"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _tint(share: float) -> str:
    """White at 0, the hot red at 1."""
    r, g, b = (round(255 - (255 - c) * share) for c in _HOT)
    return f"#{r:02x}{g:02x}{b:02x}"


class HeatOverlay:
    """The `fsm.diagram.Overlay` that draws one `Heat`."""

    def __init__(self, heat: Heat) -> None:
        self.heat = heat
        p95s = [h.p95 for (scope, st), h in heat.states.items() if h.p95 and working(scope, st)]
        self.slowest = max(p95s, default=0.0)
        self.busiest = max(heat.edges.values(), default=0)

    def state(self, scope: str, state: str) -> dict[str, str | float]:
        h = self.heat.states.get((scope, state), StateHeat())
        label = f"{state}\npassed {h.entered} · now {h.now}"
        if h.p50 is not None:
            label += f"\np50 {duration(h.p50)} · p95 {duration(h.p95)}"
        share = (h.p95 or 0.0) / self.slowest if self.slowest and working(scope, state) else 0.0
        attrs: dict[str, str | float] = {"label": label, "fillcolor": _tint(0.85 * share)}
        if share > 0.6:
            attrs["fontcolor"] = "white"
        if h.now and not (scope == "order" and is_terminal(state)):  # live orders waiting
            attrs["penwidth"] = 3
        attrs["tooltip"] = (
            f"{scope} {state}: entered {h.entered} times, {h.now} orders there now, "
            f"p50 {duration(h.p50)}, p95 {duration(h.p95)}"
        )
        return attrs

    def edge(self, edge: Edge) -> dict[str, str | float]:
        n = self.heat.edges.get((edge.scope, edge.trigger, edge.source, edge.dest), 0)
        width = 1 + 4 * math.log1p(n) / math.log1p(self.busiest) if self.busiest and n else 0.6
        return {"label": f"{edge.trigger} ×{n}", "penwidth": round(width, 2)}


def heat_svg(heat: Heat) -> bytes:
    """The machine as SVG with `heat` drawn on it (needs Graphviz)."""
    return render_dot(to_dot(None, HeatOverlay(heat)), "svg")
