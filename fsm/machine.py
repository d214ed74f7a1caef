"""The saga's states, triggers and transition tables: SPEC §1 as data. Pure, no I/O.

Design choice: one *order* machine plus one *step* machine shared by the concurrent steps
(`fsm.registry.STEPS`), rather than a HierarchicalMachine with parallel regions.
- Each step's progress (requested -> succeeded / failed / expired -> compensating ->
  compensated) is its own small column in SQL and its own line in the transition log, so a
  resumed executor reads "what happened to payment" directly instead of parsing a nested
  state name such as ``steps_running_payment_requested``.
- The join ("all settled") is one explicit decision in the executor, driven by
  `decide()` below, instead of `on_final` callbacks firing inside nested regions; the
  design table is generated here from that rule, SPEC §1's rows kept as examples it must
  contain, and is tested row by row.
- The order machine stays small enough to read against the spec at a glance.

Both machines are built once per process (`ORDER_MACHINE`, `STEP_MACHINE`) with
`auto_transitions=False`; every move is validated by `next_state`, a lookup in a table
compiled once from the machine's own events (`fire`, the slow reference it is tested
against, fires the event itself), so an undeclared move raises `MachineError` before
anything is written.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from itertools import product
from typing import Any

from transitions import Machine, MachineError

from fsm.registry import STEP_NAMES

__all__ = [
    "ORDER_MACHINE",
    "ORDER_TRANSITIONS",
    "STEP_MACHINE",
    "STEP_TRANSITIONS",
    "COMPENSATION_NEEDED",
    "DESIGN_EXAMPLES",
    "DESIGN_TABLE",
    "MachineError",
    "OrderState",
    "STEP_NAMES",
    "OrderTrigger",
    "OperatorAction",
    "AUDIT_SCOPE",
    "Outcome",
    "Status",
    "Step",
    "StepState",
    "StepTrigger",
    "Edge",
    "coarse_status",
    "decide",
    "to_compensate",
    "edges",
    "is_terminal",
    "next_state",
    "fire",
]


# A step's name; the steps, their order, services and actions are `fsm.registry.STEPS`.
Step = str


class OrderState(StrEnum):
    PENDING = "pending"
    PRODUCT_REQUESTED = "product_requested"
    REJECTED = "rejected"
    STEPS_RUNNING = "steps_running"
    COMPLETED = "completed"
    COMPENSATING = "compensating"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    NEEDS_ATTENTION = "needs_attention"
    RESOLVED = "resolved"  # an operator fixed a parked order by hand (see Status.RESOLVED)


class OrderTrigger(StrEnum):
    REQUEST_PRODUCT = "request_product"
    PRODUCT_MISSING = "product_missing"
    PRODUCT_UNAVAILABLE = "product_unavailable"
    PRODUCT_FOUND = "product_found"
    ALL_SUCCEEDED = "all_succeeded"
    SOME_FAILED = "some_failed"
    COMPENSATION_DONE = "compensation_done"
    CANCEL = "cancel"
    CANCELLATION_DONE = "cancellation_done"
    PARK = "park"
    RETRY_COMPENSATION = "retry_compensation"
    RETRY_CANCELLATION = "retry_cancellation"
    RESOLVE = "resolve"  # operator only: fsm.operator.resolve, never the executor
    DEADLINE = "deadline"  # ORDER_DEADLINE passed: the order stops waiting (issue 22)


class StepState(StrEnum):
    PENDING = "pending"
    REQUESTED = "requested"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    EXPIRED = "expired"
    COMPENSATING = "compensating"
    COMPENSATED = "compensated"


class StepTrigger(StrEnum):
    REQUEST = "request"
    SUCCEED = "succeed"
    FAIL = "fail"
    EXPIRE = "expire"
    COMPENSATE = "compensate"
    FINISH_COMPENSATION = "finish_compensation"


class Status(StrEnum):
    """The coarse status the API shows; several FSM states share one."""

    PENDING = "pending"
    RUNNING = "running"
    COMPENSATING = "compensating"
    COMPLETED = "completed"
    FAILED = "failed"
    REJECTED = "rejected"
    CANCELLED = "cancelled"
    NEEDS_ATTENTION = "needs_attention"
    # Its own terminal status, not `failed` or `cancelled`: like Temporal's "Terminated"
    # and Step Functions' "Aborted", an end an operator imposed must stay distinguishable
    # from one the saga reached itself. `failed`/`cancelled` promise that every effect was
    # undone by the saga; after `resolve` the books were settled by hand, outside it, and
    # counts, filters and alerts should be able to tell the two apart.
    RESOLVED = "resolved"


class OperatorAction(StrEnum):
    """What a person did to an order (issue 17). Each is logged as its own audit row in
    the transition log — scope `AUDIT_SCOPE`, from = to: not a move, so no edge, no crash
    point and no change to MACHINE_VERSION — naming who and why, before the action runs."""

    RESUME = "resume"
    RETRY_COMPENSATION = "retry_compensation"
    CANCEL = "cancel"
    RESOLVE = "resolve"


AUDIT_SCOPE = "operator"

S, T = OrderState, OrderTrigger

# trigger, source(s), destination: every edge the order may take. Nothing else exists.
ORDER_TRANSITIONS: list[tuple[OrderTrigger, OrderState | list[OrderState], OrderState]] = [
    (T.REQUEST_PRODUCT, S.PENDING, S.PRODUCT_REQUESTED),  # intent: look the product up
    (T.PRODUCT_MISSING, S.PRODUCT_REQUESTED, S.REJECTED),  # row 2: 404, call nothing else
    (T.PRODUCT_UNAVAILABLE, S.PRODUCT_REQUESTED, S.FAILED),  # lookup unknown past deadline
    (T.PRODUCT_FOUND, S.PRODUCT_REQUESTED, S.STEPS_RUNNING),  # amount fixed here
    (T.ALL_SUCCEEDED, S.STEPS_RUNNING, S.COMPLETED),  # row 1
    (T.SOME_FAILED, S.STEPS_RUNNING, S.COMPENSATING),  # rows 3-7
    (T.COMPENSATION_DONE, S.COMPENSATING, S.FAILED),
    (T.CANCEL, S.COMPLETED, S.CANCELLING),  # the owner cancels a completed order
    (T.CANCELLATION_DONE, S.CANCELLING, S.CANCELLED),
    (T.PARK, [S.COMPENSATING, S.CANCELLING], S.NEEDS_ATTENTION),  # retry budget spent
    (T.RETRY_COMPENSATION, S.NEEDS_ATTENTION, S.COMPENSATING),
    (T.RETRY_CANCELLATION, S.NEEDS_ATTENTION, S.CANCELLING),
    (T.RESOLVE, S.NEEDS_ATTENTION, S.RESOLVED),  # fixed by hand; the reason in the log
    # The order's own deadline (ORDER_SAGA_ORDER_DEADLINE after creation) passed: before the
    # steps nothing was done, so it fails; during them, every step not yet succeeded is
    # expired first (a `requested` one may have been applied) and the order compensates.
    # Compensating, cancelling and parked orders are never cut short (a parked one is flagged).
    (T.DEADLINE, [S.PENDING, S.PRODUCT_REQUESTED], S.FAILED),
    (T.DEADLINE, S.STEPS_RUNNING, S.COMPENSATING),
]

SS, ST = StepState, StepTrigger

STEP_TRANSITIONS: list[tuple[StepTrigger, StepState | list[StepState], StepState]] = [
    (ST.REQUEST, SS.PENDING, SS.REQUESTED),  # intent, committed before the call
    (ST.SUCCEED, SS.REQUESTED, SS.SUCCEEDED),  # 2xx
    (ST.FAIL, SS.REQUESTED, SS.FAILED),  # definite "no": had no effect
    (ST.EXPIRE, SS.REQUESTED, SS.EXPIRED),  # unknown past its deadline: maybe applied
    (ST.COMPENSATE, [SS.SUCCEEDED, SS.EXPIRED], SS.COMPENSATING),
    (ST.FINISH_COMPENSATION, SS.COMPENSATING, SS.COMPENSATED),  # only on a 2xx
]

TERMINAL_ORDER_STATES = frozenset({S.REJECTED, S.COMPLETED, S.FAILED, S.CANCELLED, S.RESOLVED})
# Steps whose effect may exist and so must be undone when the order fails or is cancelled.
COMPENSATION_NEEDED = frozenset({SS.SUCCEEDED, SS.EXPIRED, SS.COMPENSATING})

_STATUS = {
    S.PENDING: Status.PENDING,
    S.PRODUCT_REQUESTED: Status.RUNNING,
    S.STEPS_RUNNING: Status.RUNNING,
    S.REJECTED: Status.REJECTED,
    S.COMPLETED: Status.COMPLETED,
    S.COMPENSATING: Status.COMPENSATING,
    S.CANCELLING: Status.COMPENSATING,
    S.FAILED: Status.FAILED,
    S.CANCELLED: Status.CANCELLED,
    S.NEEDS_ATTENTION: Status.NEEDS_ATTENTION,
    S.RESOLVED: Status.RESOLVED,
}


class Outcome(StrEnum):
    SUCCESS = "success"
    FAILED = "failed"


def _settled(steps: Mapping[Step, StepState]) -> None:
    unsettled = [s for s, st in steps.items() if st in (SS.PENDING, SS.REQUESTED)]
    if unsettled:
        raise ValueError(f"steps not settled yet: {', '.join(unsettled)}")


def decide(steps: Mapping[Step, StepState]) -> OrderTrigger:
    """The join: once every step has settled, complete or compensate (SPEC §1 rows 1, 3-7)."""
    _settled(steps)
    if all(st == SS.SUCCEEDED for st in steps.values()):
        return T.ALL_SUCCEEDED
    return T.SOME_FAILED


def to_compensate(steps: Mapping[Step, StepState]) -> frozenset[Step]:
    """The steps whose effect may exist and so must be undone: "compensate exactly what
    succeeded" (an expired step may have been applied; a compensating one is under way)."""
    return frozenset(step for step, state in steps.items() if state in COMPENSATION_NEEDED)


# SPEC §1 as data: each step's outcome (in the registry's order) -> (order status, compensations).
# Generated from the rule `decide`/`to_compensate` implement, "compensate exactly what
# succeeded", for every combination of outcomes (2^steps rows), so a step added to the
# registry is covered without writing its rows. The "product 404" row never reaches the steps; it is
# the PRODUCT_MISSING edge above.
Outcomes = tuple[Outcome, ...]


def _row(outcomes: Outcomes) -> tuple[Status, frozenset[Step]]:
    settled = {
        step: SS.SUCCEEDED if outcome is Outcome.SUCCESS else SS.FAILED
        for step, outcome in zip(STEP_NAMES, outcomes, strict=True)
    }
    if decide(settled) == T.ALL_SUCCEEDED:
        return Status.COMPLETED, frozenset()
    return Status.FAILED, to_compensate(settled)


DESIGN_TABLE: Mapping[Outcomes, tuple[Status, frozenset[Step]]] = {
    outcomes: _row(outcomes) for outcomes in product(Outcome, repeat=len(STEP_NAMES))
}

# SPEC §1's own rows, spelled out for a reader (payment, inventory, shipping): the generated
# table must contain each of them (tests/test_machine.py).
_OK, _NO = Outcome.SUCCESS, Outcome.FAILED
DESIGN_EXAMPLES: Mapping[Outcomes, tuple[Status, frozenset[Step]]] = {
    (_OK, _OK, _OK): (Status.COMPLETED, frozenset()),  # row 1
    (_NO, _OK, _OK): (Status.FAILED, frozenset({"inventory", "shipping"})),  # row 3
    (_OK, _NO, _OK): (Status.FAILED, frozenset({"payment", "shipping"})),  # row 4
    (_OK, _OK, _NO): (Status.FAILED, frozenset({"payment", "inventory"})),  # row 5
    (_NO, _NO, _OK): (Status.FAILED, frozenset({"shipping"})),  # row 6
    (_NO, _NO, _NO): (Status.FAILED, frozenset()),  # row 7
}


def coarse_status(state: str) -> Status:
    return _STATUS[OrderState(state)]


def is_terminal(state: str) -> bool:
    return OrderState(state) in TERMINAL_ORDER_STATES


@dataclass(frozen=True)
class Edge:
    """One declared transition: scope is "order" or a step name."""

    scope: str
    trigger: str
    source: str
    dest: str


def edges() -> Iterator[Edge]:
    """Every declared edge of both machines, steps expanded per step (crash points)."""
    for trigger, sources, dest in ORDER_TRANSITIONS:
        for source in sources if isinstance(sources, list) else [sources]:
            yield Edge("order", trigger, source, dest)
    for step in STEP_NAMES:
        for step_trigger, step_sources, step_dest in STEP_TRANSITIONS:
            for origin in step_sources if isinstance(step_sources, list) else [step_sources]:
                yield Edge(step, step_trigger, origin, step_dest)


def _build(states: type[StrEnum], table: list[Any], initial: StrEnum) -> Machine:
    return Machine(
        model=None,
        states=[s.value for s in states],
        transitions=[
            {
                "trigger": t.value,
                "source": [x.value for x in src] if isinstance(src, list) else src.value,
                "dest": dst.value,
            }
            for t, src, dst in table
        ],
        initial=initial.value,
        auto_transitions=False,
        ignore_invalid_triggers=False,
    )


ORDER_MACHINE = _build(OrderState, ORDER_TRANSITIONS, S.PENDING)
STEP_MACHINE = _build(StepState, STEP_TRANSITIONS, SS.PENDING)


class _Probe:
    """A throwaway model: lets the shared machine validate one move without side effects."""

    def __init__(self, state: str) -> None:
        self.state = state


def fire(machine: Machine, state: str, trigger: str) -> str:
    """Fire `trigger` on a throwaway model in `state`; where it lands (raises MachineError).
    The reference `next_state` is compiled against (see tests/test_machine.py)."""
    event = machine.events.get(trigger)
    if event is None:
        raise MachineError(f'"{trigger}" is not a trigger of this machine')
    probe = _Probe(str(state))  # plain str: transitions reads an Enum by its name
    event.trigger(probe)
    return probe.state


def _compile(machine: Machine) -> dict[tuple[str, str], str]:
    """Every (state, trigger) -> destination, read off the built machine's own events."""
    return {
        (source, name): str(moves[0].dest)
        for name, event in machine.events.items()
        for source, moves in event.transitions.items()
    }


_MOVES = {id(ORDER_MACHINE): _compile(ORDER_MACHINE), id(STEP_MACHINE): _compile(STEP_MACHINE)}


def next_state(machine: Machine, state: str, trigger: str) -> str:
    """Where `trigger` takes `state` on one of the two machines; raises MachineError.

    A dictionary compiled from the machine's events once: firing the event on a probe
    model cost ~20 µs idle and ~100 µs under load, per transition, on the hot path.
    """
    try:
        return _MOVES[id(machine)][(str(state), str(trigger))]
    except KeyError:
        raise MachineError(f'cannot "{trigger}" from state {state}') from None
