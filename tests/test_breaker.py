"""The circuit breaker on its own (fsm/breaker.py): opening, the single half-open probe,
closing, waiting without spending attempts, bounded release, logs and metrics. The calls
are plain coroutines that answer or raise; no service, no mock."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import REGISTRY

from fsm.breaker import CLOSED, HALF_OPEN, OPEN, Breaker, Breakers, call_through
from fsm.errors import BreakerWaitOver, BusinessFailure, CircuitOpen, TransientFailure
from tests.support.waiting import wait_until_async


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Service:
    """Counts the calls that reach it; answers as told."""

    def __init__(self) -> None:
        self.calls = 0
        self.down = True
        self.in_flight = 0
        self.most_in_flight = 0
        self.gate: asyncio.Event | None = None

    async def __call__(self) -> str:
        self.calls += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.down:
                raise TransientFailure("503")
            return "ok"
        finally:
            self.in_flight -= 1


async def fail_n(breaker: Breaker, service: Service, n: int) -> None:
    for _ in range(n):
        with pytest.raises(TransientFailure):
            await breaker.call(service)


async def test_opens_after_threshold_consecutive_transient_failures() -> None:
    clock, service = Clock(), Service()
    breaker = Breaker("user", threshold=3, cooldown=10, clock=clock)
    await fail_n(breaker, service, 2)
    service.down = False
    assert await breaker.call(service) == "ok"  # a success resets the count
    service.down = True
    await fail_n(breaker, service, 2)

    async def no() -> str:
        raise BusinessFailure("402")

    with pytest.raises(BusinessFailure):  # a definite answer also resets it
        await breaker.call(no)
    await fail_n(breaker, service, 2)
    assert breaker.state == CLOSED
    await fail_n(breaker, service, 1)
    assert breaker.state == OPEN

    before = service.calls
    with pytest.raises(CircuitOpen) as refused:
        await breaker.call(service)
    assert service.calls == before  # open: no call made
    assert refused.value.retry_after == 10
    assert breaker.stats.rejected == 1


async def test_half_open_lets_exactly_one_probe_through() -> None:
    clock, service = Clock(), Service()
    breaker = Breaker("user", threshold=1, cooldown=5, clock=clock)
    await fail_n(breaker, service, 1)
    clock.now += 5
    assert breaker.state == HALF_OPEN
    service.gate = asyncio.Event()
    probe = asyncio.create_task(breaker.call(service))
    await asyncio.sleep(0)  # let the probe start (ordering only, not timing)
    with pytest.raises(CircuitOpen):
        await breaker.call(service)  # a second caller while the probe is in flight
    assert service.calls == 2  # the first failure and the probe
    service.down = True
    service.gate.set()
    with pytest.raises(TransientFailure):
        await probe
    assert breaker.state == OPEN  # probe failed: open again, a fresh cool-down
    assert breaker.retry_after() == 5

    clock.now += 5
    service.gate, service.down = None, False
    assert await breaker.call(service) == "ok"
    assert breaker.state == CLOSED
    assert breaker.stats.probes == 2


async def test_a_cancelled_probe_frees_the_probe_slot() -> None:
    clock, service = Clock(), Service()
    breaker = Breaker("user", threshold=1, cooldown=1, clock=clock)
    await fail_n(breaker, service, 1)
    clock.now += 1
    service.gate = asyncio.Event()
    probe = asyncio.create_task(breaker.call(service))
    await asyncio.sleep(0)
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    service.gate, service.down = None, False
    assert await breaker.call(service) == "ok"  # another caller may probe now


async def test_waiters_spend_no_call_and_are_released_in_bounded_batches() -> None:
    service = Service()
    breaker = Breaker("user", threshold=2, cooldown=0.05, batch=3)
    guarded = Breakers()  # unrelated breakers stay closed
    assert guarded["user.deduct"].state == CLOSED and guarded.not_closed() == {}
    await fail_n(breaker, service, 2)
    assert breaker.state == OPEN

    async def order() -> str:
        return await call_through(lambda: breaker.call(service), deadline=None)

    waiters = [asyncio.create_task(order()) for _ in range(12)]
    # Until a probe has failed at least twice: the waiters kept waiting meanwhile. Polled
    # well inside the 0.05 s cool-down, so the service comes back before a third probe.
    await wait_until_async(
        lambda: breaker.stats.probes >= 2, what="two failed probes", interval=0.005
    )
    assert service.calls == 2 + breaker.stats.probes  # the failures, then only probes
    service.down = False
    assert await asyncio.gather(*waiters) == ["ok"] * 12
    assert breaker.state == CLOSED
    assert service.most_in_flight <= 3  # released through the batch semaphore
    assert service.calls == 2 + breaker.stats.probes + 11  # each waiter called once more


async def test_a_deadline_ends_the_wait_with_circuit_open() -> None:
    service = Service()
    breaker = Breaker("user", threshold=1, cooldown=60)
    await fail_n(breaker, service, 1)
    deadline = datetime.now(UTC) + timedelta(seconds=0.05)
    with pytest.raises(CircuitOpen):
        await call_through(lambda: breaker.call(service), deadline=deadline)
    assert service.calls == 1


async def test_patience_ends_the_wait_with_breaker_wait_over() -> None:
    """A compensation's bound (no deadline): waiting spends no call, and once `patience`
    has passed the caller gets BreakerWaitOver naming the breaker, not an endless wait."""
    service = Service()
    breaker = Breaker("inventory.restore", threshold=1, cooldown=60)
    await fail_n(breaker, service, 1)
    with pytest.raises(BreakerWaitOver) as over:
        await call_through(lambda: breaker.call(service), deadline=None, patience=0.05)
    assert service.calls == 1 and over.value.service == "inventory.restore"
    assert "still open after 0.05s of waiting" in str(over.value)
    assert isinstance(over.value.__cause__, CircuitOpen)


async def test_patience_counts_from_the_first_wait_across_failed_probes() -> None:
    service = Service()
    breaker = Breaker("shipping.cancel", threshold=1, cooldown=0.01)
    await fail_n(breaker, service, 1)
    with pytest.raises(BreakerWaitOver):  # probes fail meanwhile: still one bound
        await call_through(lambda: breaker.call(service), deadline=None, patience=0.2)
    assert breaker.stats.probes >= 1 and breaker.state != CLOSED


async def test_an_earlier_deadline_wins_over_patience() -> None:
    service = Service()
    breaker = Breaker("user", threshold=1, cooldown=60)
    await fail_n(breaker, service, 1)
    deadline = datetime.now(UTC) + timedelta(seconds=0.05)
    with pytest.raises(CircuitOpen) as refused:
        await call_through(lambda: breaker.call(service), deadline=deadline, patience=30)
    assert not isinstance(refused.value, BreakerWaitOver)  # a forward step's semantics


async def test_state_changes_are_logged_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    clock, service = Clock(), Service()
    breaker = Breaker("shipping", threshold=1, cooldown=1, clock=clock)

    def moves(to: str) -> float:
        labels = {"operation": "shipping", "from_state": CLOSED, "to_state": to}
        return REGISTRY.get_sample_value("order_saga_breaker_transitions_total", labels) or 0.0

    opened = moves(OPEN)
    with caplog.at_level(logging.INFO, logger="order_saga.breaker"):
        await fail_n(breaker, service, 1)
        clock.now += 1
        service.down = False
        await breaker.call(service)
    assert moves(OPEN) == opened + 1
    assert REGISTRY.get_sample_value("order_saga_breaker_state", {"operation": "shipping"}) == 0
    text = caplog.text
    assert "circuit breaker shipping: closed -> open" in text
    assert "open -> half_open" in text and "half_open -> closed" in text


async def test_check_refuses_only_while_open() -> None:
    breakers = Breakers(threshold=1, cooldown=60)
    breakers.check("product.get")  # never called: fine
    await fail_n(breakers["product.get"], Service(), 1)
    with pytest.raises(CircuitOpen) as refused:
        breakers.check("product.get")
    assert 0 < refused.value.retry_after <= 60
    assert breakers.not_closed() == {"product.get": OPEN}
