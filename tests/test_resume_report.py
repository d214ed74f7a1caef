"""`order-saga resume`'s report (order_saga.resume_report), one case per exit code of
README's table ("Resuming stuck orders") and `resume --help`, without a database: the
orders are built as a run would leave them. Exit 2 (bad input) is the command's, before
there is anything to report: run for real here, with no database it could reach.
"""

from __future__ import annotations

import itertools
import uuid
from datetime import UTC, datetime

import pytest

from fsm.machine import OrderState, Status
from fsm.models import Order
from order_saga.resume_report import report
from tests.support.processes import run_cli

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def order(state: OrderState, status: Status, reason: str | None = None) -> Order:
    return Order(
        id=uuid.uuid4(),
        user_id=1,
        product_id=1,
        quantity=1,
        state=state,
        status=status,
        created_at=NOW,
        updated_at=NOW,
        attention_reason=reason,
    )


def done() -> Order:
    return order(OrderState.COMPLETED, Status.COMPLETED)


def parked() -> Order:
    return order(OrderState.NEEDS_ATTENTION, Status.NEEDS_ATTENTION, "refund refused")


def running() -> Order:
    return order(OrderState.STEPS_RUNNING, Status.RUNNING)


def test_exit_0_when_every_order_taken_ended_terminal() -> None:
    ended = [
        done(),
        order(OrderState.FAILED, Status.FAILED),
        order(OrderState.REJECTED, Status.REJECTED),
    ]
    got = report(ended, dry_run=False, counts={"found": 3, "resumed": 3})
    assert got.code == 0
    assert got.notes == ()
    assert got.summary["still_parked"] == got.summary["not_finished"] == []
    assert [o["id"] for o in got.summary["orders"]] == [str(o.id) for o in ended]  # type: ignore[attr-defined]


def test_exit_0_when_nothing_was_stuck() -> None:
    assert report([], dry_run=False, counts={"found": 0}).code == 0


def test_exit_1_when_a_run_failed_with_an_error_whatever_else() -> None:
    # The first that applies: an error outranks parked and unfinished orders.
    got = report([parked(), running()], dry_run=False, held=1, errors=1)
    assert got.code == 1
    assert len(got.notes) == 3  # what is left is still said


def test_exit_3_when_some_stay_parked_each_named_with_its_reason() -> None:
    stuck = parked()
    got = report([done(), stuck, running()], dry_run=False, held=2)
    assert got.code == 3  # before 4: parked outranks unfinished and held
    assert f"still parked: {stuck.id}: refund refused" in got.notes
    assert got.summary["still_parked"] == [str(stuck.id)]


def test_exit_4_when_some_are_not_finished() -> None:
    left = running()
    got = report([done(), left], dry_run=False)
    assert got.code == 4
    assert got.notes == (f"not finished: {left.id} steps_running (running)",)
    assert got.summary["not_finished"] == [str(left.id)]


def test_exit_4_when_some_were_held_by_another_driver() -> None:
    got = report([done()], dry_run=False, held=2)
    assert got.code == 4
    assert got.notes == ("held by another driver: 2 (not resumed)",)


def test_a_dry_run_exits_0_and_lists_what_is_parked_now() -> None:
    now = parked()
    got = report([now, running()], dry_run=True, held=1, errors=1, counts={"found": 2})
    assert got.code == 0
    assert got.notes == ()  # it tried nothing: nothing is "still" parked or unfinished
    assert got.summary["parked_now"] == [str(now.id)]
    assert got.summary["still_parked"] == got.summary["not_finished"] == []


def test_the_summary_starts_with_the_runs_counts() -> None:
    counts = {"found": 1, "resumed": 1, "errors": 0}
    got = report([done()], dry_run=False, counts=counts)
    assert list(got.summary)[:4] == ["found", "resumed", "errors", "dry_run"]
    assert "parked_now" not in got.summary


@pytest.mark.parametrize("dry_run", [False, True])
def test_exit_2_is_never_the_reports(dry_run: bool) -> None:
    # Bad input exits 2 before there is anything to report (below): whatever the run
    # left, the report says 0, 1, 3 or 4.
    kinds = (done, parked, running)
    codes = {
        report([make() for make in mix], dry_run=dry_run, held=held, errors=errors).code
        for n in range(3)
        for mix in itertools.combinations_with_replacement(kinds, n)
        for held in (0, 1)
        for errors in (0, 1)
    }
    assert codes == ({0} if dry_run else {0, 1, 3, 4})


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["--limit", "-5"], {}, "Invalid value for '--limit'"),
        (["--order", "nothex"], {}, "--order: "),
        ([], {"ORDER_SAGA_MAX_ATTEMPTS": "many"}, "ORDER_SAGA_MAX_ATTEMPTS"),
    ],
)
def test_exit_2_on_bad_input_before_anything_runs(
    args: list[str], env: dict[str, str], says: str
) -> None:
    unreachable = "postgresql+psycopg://postgres@127.0.0.1:1/nothing"  # nothing listens
    result = run_cli("resume", *args, ORDER_SAGA_DATABASE_URL=unreachable, **env)
    assert result.returncode == 2, result.stderr
    assert says in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr
