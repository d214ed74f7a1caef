"""Leases, deadlines and sweep ages are computed from each process's own clock: a process
whose clock is off from the database's by more than a quarter of the lease refuses to
start (a worker 60 s ahead took leases other workers still held), a smaller skew is
logged (fsm.clock). The decision over a table of readings, then `open_saga` itself."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

import pytest

from fsm.clients import Services
from fsm.clock import ClockSkew, check
from fsm.queries import utcnow
from fsm.wiring import open_saga
from tests.support.settings import saga_settings

DB_NOW = datetime.fromisoformat("2026-12-01T12:00:00+00:00")
OK, WARNS, REFUSED = "ok", "warns", "refused"


@pytest.mark.parametrize(
    ("ahead", "round_trip", "lease", "outcome"),
    [
        (0.0, 0.004, 30.0, OK),  # NTP-synced hosts
        (0.5, 0.004, 30.0, OK),  # below WARN_SKEW
        (3.0, 0.004, 30.0, WARNS),  # above WARN_SKEW, below a quarter of the lease
        (-3.0, 0.004, 30.0, WARNS),  # behind: deadlines run late, leases held too long
        (60.0, 0.004, 30.0, REFUSED),  # the reviewer's worker B: takes live leases
        (-60.0, 0.004, 30.0, REFUSED),
        (8.0, 0.004, 30.0, REFUSED),  # past 7.5 s, a quarter of 30 s
        (8.0, 2.0, 30.0, WARNS),  # 8 ± 1 s: not provably past 7.5 s
        (0.9, 2.0, 30.0, OK),  # within the round trip's uncertainty
        (0.2, 0.004, 1.0, WARNS),  # a short lease: warns above half its quarter
        (0.3, 0.004, 1.0, REFUSED),
    ],
)
def test_the_skew_decides_start_warn_or_refuse(
    ahead: float, round_trip: float, lease: float, outcome: str
) -> None:
    # The database read its clock at the round trip's middle; this clock reads `ahead` more.
    sent = DB_NOW + timedelta(seconds=ahead - round_trip / 2)
    received = sent + timedelta(seconds=round_trip)
    try:
        warning = check(db_now=DB_NOW, sent=sent, received=received, lease_seconds=lease)
    except ClockSkew as exc:
        assert outcome == REFUSED, exc
        where = "ahead of" if ahead > 0 else "behind"
        assert f"{abs(ahead):.1f} s {where} the database's" in str(exc)
        assert "sync the clock (NTP" in str(exc)
        assert "\n" not in str(exc)
        return
    assert outcome == (WARNS if warning else OK), warning
    assert not warning or f"{abs(ahead):.1f} s" in warning


async def test_a_process_whose_clock_runs_a_minute_ahead_refuses_to_start(
    db_url: str, services: Services, caplog: pytest.LogCaptureFixture
) -> None:
    """On PostgreSQL; on SQLite every process reads the one host's clock: nothing to
    compare, it starts."""
    settings = saga_settings(db_url, lease_seconds=30)

    def ahead(seconds: float) -> Callable[[], datetime]:
        return lambda: utcnow() + timedelta(seconds=seconds)

    if db_url.startswith("sqlite"):
        async with open_saga(settings, services=services, clock=ahead(60)):
            return
    with pytest.raises(ClockSkew, match=r"6\d\.\d s ahead of the database's"):
        async with open_saga(settings, services=services, clock=ahead(60)):
            pytest.fail("started with a clock a minute ahead")
    with caplog.at_level(logging.WARNING, logger="order_saga.clock"):
        async with open_saga(settings, services=services, clock=ahead(3)):
            pass
    assert any("s ahead of the database's" in r.getMessage() for r in caplog.records)
