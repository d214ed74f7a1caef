"""What `order-saga resume` reports once its run is over, worked out from the orders it
took: the exit code, the JSON summary (`--json`) and the lines for stderr. Pure: it prints
nothing and reads nothing, so each exit code is tested on its own (tests/test_resume_report.py).

The exit codes are README's table ("Resuming stuck orders") and `resume --help`'s: 0 every
order taken ended terminal (a dry run: always), 1 a run failed with an error, 3 some stay
parked, 4 some are not finished or were held by another driver; the first that applies.
Exit 2 (bad input) and the exits of an unknown or held `--order` are the command's own:
they happen before there is anything to report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fsm.machine import Status, is_terminal
from fsm.models import HELD_HINT, Order

OK, ERROR, PARKED, NOT_FINISHED = 0, 1, 3, 4


@dataclass(frozen=True)
class ResumeReport:
    code: int  # the process's exit code
    summary: dict[str, object]  # `--json`'s one document
    notes: tuple[str, ...]  # what is left to do, one line each, for stderr


def report(
    orders: Sequence[Order],
    *,
    dry_run: bool,
    held: int = 0,
    errors: int = 0,
    counts: Mapping[str, object] | None = None,
    left_held: Sequence[Order] = (),
) -> ResumeReport:
    """The report on `orders` (each as the run left it, or as it is now on a dry run):
    `held` were held by another driver (skipped, or lost to one mid-run), `errors` runs
    failed with an error, `counts` the run's summary figures, first in the JSON;
    `left_held` were left alone, held for an operator (Order.held: not finished either)."""
    parked = [o for o in orders if o.status == Status.NEEDS_ATTENTION]
    # A dry run tried nothing: a parked order is not "still" parked, only parked now.
    still = [] if dry_run else parked
    unfinished = [
        o
        for o in orders
        if not (dry_run or is_terminal(o.state) or o.status == Status.NEEDS_ATTENTION)
    ]
    # The operator has work (see `order-saga orders show`); an unfinished order had its
    # retries spent for this run: a later resume continues it.
    notes = [f"still parked: {o.id}: {o.attention_reason}" for o in still]
    notes += [f"not finished: {o.id} {o.state} ({o.status})" for o in unfinished]
    if held and not dry_run:
        notes.append(f"held by another driver: {held} (not resumed)")
    if not dry_run:
        notes += [
            f"held for an operator: {o.id} ({o.interruptions} interruptions in a row): {HELD_HINT}"
            for o in left_held
        ]
    summary: dict[str, object] = {
        **(counts or {}),
        "dry_run": dry_run,
        "orders": [
            {"id": str(o.id), "state": o.state, "status": o.status, "reason": o.attention_reason}
            for o in orders
        ],
        "still_parked": [str(o.id) for o in still],
        "not_finished": [str(o.id) for o in unfinished],
        "held_for_operator": [str(o.id) for o in left_held],
    }
    if dry_run:
        summary["parked_now"] = [str(o.id) for o in parked]
        return ResumeReport(OK, summary, tuple(notes))
    if errors:
        code = ERROR
    elif still:
        code = PARKED
    else:
        code = NOT_FINISHED if unfinished or held or left_held else OK
    return ResumeReport(code, summary, tuple(notes))
