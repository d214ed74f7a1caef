"""Properties of the machines and of the join, over arbitrary inputs (hypothesis): the
declared tables are the only truth, so every generated case is checked against them."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fsm.machine import (
    COMPENSATION_NEEDED,
    ORDER_MACHINE,
    STEP_MACHINE,
    OrderState,
    OrderTrigger,
    StepState,
    decide,
    edges,
    next_state,
    to_compensate,
)
from fsm.registry import STEP_NAMES

SETTLED = [s for s in StepState if s not in (StepState.PENDING, StepState.REQUESTED)]
settled_steps = st.fixed_dictionaries({step: st.sampled_from(SETTLED) for step in STEP_NAMES})


@given(settled_steps)
def test_to_compensate_is_exactly_the_steps_whose_effect_may_exist(
    steps: dict[str, StepState],
) -> None:
    assert to_compensate(steps) == {s for s, state in steps.items() if state in COMPENSATION_NEEDED}


@given(settled_steps)
def test_decide_completes_iff_every_step_succeeded(steps: dict[str, StepState]) -> None:
    all_ok = all(state is StepState.SUCCEEDED for state in steps.values())
    assert decide(steps) == (OrderTrigger.ALL_SUCCEEDED if all_ok else OrderTrigger.SOME_FAILED)


ORDER_EDGES = {(e.source, e.trigger): e.dest for e in edges() if e.scope == "order"}
STEP_EDGES = {(e.source, e.trigger): e.dest for e in edges() if e.scope == STEP_NAMES[0]}


@given(st.lists(st.integers(min_value=0), max_size=30))
def test_random_walk_over_order_edges_stays_on_declared_states(choices: list[int]) -> None:
    state: str = OrderState.PENDING
    for choice in choices:
        out = sorted((t, d) for (s, t), d in ORDER_EDGES.items() if s == state)
        if not out:
            break  # terminal
        trigger, dest = out[choice % len(out)]
        assert next_state(ORDER_MACHINE, state, trigger) == dest
        state = dest
        assert state in set(OrderState)


@given(st.lists(st.integers(min_value=0), max_size=10))
def test_random_walk_over_step_edges_stays_on_declared_states(choices: list[int]) -> None:
    state: str = StepState.PENDING
    for choice in choices:
        out = sorted((t, d) for (s, t), d in STEP_EDGES.items() if s == state)
        if not out:
            break
        trigger, dest = out[choice % len(out)]
        assert next_state(STEP_MACHINE, state, trigger) == dest
        state = dest
        assert state in set(StepState)
