"""Doubling waits (a parked order's pauses, an event's delivery retries) stay at their cap
however many times an order parked or a delivery failed: never an overflow that would
fail the order's run, or the relay's batch, at every later try."""

from __future__ import annotations

import pytest

from fsm.relay import backoff
from fsm.retry import doubling


def test_waits_double_from_the_base_up_to_the_cap() -> None:
    assert [doubling(300.0, 3600.0, n) for n in range(1, 7)] == [
        300.0,
        600.0,
        1200.0,
        2400.0,
        3600.0,
        3600.0,
    ]


@pytest.mark.parametrize("n", [1025, 5000, 10**9])
def test_after_any_number_of_tries_the_wait_is_the_cap(n: int) -> None:
    assert doubling(300.0, 3600.0, n) == 3600.0
    assert doubling(1e-9, 1e9, n) == 1e9  # the smallest base, the largest cap settings allow
    assert 0.05 <= backoff(n, base=0.02, cap=0.1) <= 0.1
