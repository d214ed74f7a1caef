"""The machines accept exactly the declared edges (SPEC §1 as data) and nothing else."""

from __future__ import annotations

import itertools

import pytest
from transitions import Machine

from fsm.machine import (
    DESIGN_EXAMPLES,
    DESIGN_TABLE,
    ORDER_MACHINE,
    STEP_MACHINE,
    MachineError,
    OrderState,
    OrderTrigger,
    Outcome,
    Status,
    StepState,
    StepTrigger,
    decide,
    edges,
    fire,
    next_state,
    to_compensate,
)
from fsm.registry import STEP_NAMES

DECLARED = {
    (e.scope if e.scope == "order" else "step", e.trigger, e.source): e.dest for e in edges()
}
ORDER_MOVES = list(itertools.product(OrderState, OrderTrigger))
STEP_MOVES = list(itertools.product(StepState, StepTrigger))


MOVES = [("order", ORDER_MACHINE, st, tr) for st, tr in ORDER_MOVES] + [
    ("step", STEP_MACHINE, st, tr) for st, tr in STEP_MOVES
]


@pytest.mark.parametrize(
    ("scope", "machine", "state", "trigger"),
    MOVES,
    ids=[f"{m}-{st}-{tr}" for m, _, st, tr in MOVES],
)
def test_machines_accept_only_declared_edges(
    scope: str, machine: Machine, state: str, trigger: str
) -> None:
    dest = DECLARED.get((scope, trigger, state))
    if dest is None:
        with pytest.raises(MachineError):
            next_state(machine, state, trigger)
        with pytest.raises(MachineError):  # the machine itself agrees: no such edge
            fire(machine, state, trigger)
    else:
        assert next_state(machine, state, trigger) == dest
        assert fire(machine, state, trigger) == dest  # compiled table == firing the event


def test_no_auto_transitions_or_unknown_triggers() -> None:
    with pytest.raises(MachineError):
        next_state(ORDER_MACHINE, "pending", "to_completed")
    with pytest.raises(MachineError):
        next_state(STEP_MACHINE, "pending", "request_product")


def test_the_design_table_has_a_row_for_every_combination_of_outcomes() -> None:
    assert len(DESIGN_TABLE) == 2 ** len(STEP_NAMES)
    assert set(DESIGN_TABLE) == set(itertools.product(Outcome, repeat=len(STEP_NAMES)))


@pytest.mark.parametrize("outcomes", list(DESIGN_EXAMPLES), ids=str)
def test_the_generated_table_contains_the_spelled_out_rows(outcomes: tuple[Outcome, ...]) -> None:
    assert DESIGN_TABLE[outcomes] == DESIGN_EXAMPLES[outcomes]


@pytest.mark.parametrize("outcomes", list(DESIGN_TABLE), ids=str)
def test_every_row_compensates_exactly_what_succeeded(outcomes: tuple[Outcome, ...]) -> None:
    """SPEC §1's rule, written here without the machine's helpers: all succeeded ->
    completed, nothing undone; otherwise failed, and every step that succeeded undone."""
    succeeded = frozenset(
        s for s, o in zip(STEP_NAMES, outcomes, strict=True) if o is Outcome.SUCCESS
    )
    if succeeded == frozenset(STEP_NAMES):
        assert DESIGN_TABLE[outcomes] == (Status.COMPLETED, frozenset())
    else:
        assert DESIGN_TABLE[outcomes] == (Status.FAILED, succeeded)


@pytest.mark.parametrize("outcomes", list(DESIGN_TABLE), ids=str)
def test_decide_and_to_compensate_follow_the_design_table(outcomes: tuple[Outcome, ...]) -> None:
    """Each row's outcomes as settled step states, an expired step counted as one that may
    have been applied; the row itself is the expectation."""
    states = {
        step: StepState.SUCCEEDED if o is Outcome.SUCCESS else StepState.FAILED
        for step, o in zip(STEP_NAMES, outcomes, strict=True)
    }
    status, compensate = DESIGN_TABLE[outcomes]
    expected = (
        OrderTrigger.ALL_SUCCEEDED if status == Status.COMPLETED else OrderTrigger.SOME_FAILED
    )
    assert decide(states) == expected
    if expected == OrderTrigger.SOME_FAILED:  # a completed order undoes nothing
        assert to_compensate(states) == compensate
    expired = {**states, STEP_NAMES[0]: StepState.EXPIRED}
    assert decide(expired) == OrderTrigger.SOME_FAILED
    assert STEP_NAMES[0] in to_compensate(expired)


def test_decide_waits_for_every_step() -> None:
    with pytest.raises(ValueError, match="not settled"):
        decide(
            {
                "payment": StepState.SUCCEEDED,
                "inventory": StepState.REQUESTED,
                "shipping": StepState.FAILED,
            }
        )
