"""Prometheus metrics of the orchestrator: counters and histograms the executor updates,
and `order_saga_orders{status}`, counted in SQL at scrape time by a custom collector (a
status whose count drops to zero shows 0, never a stale last value). Served by the API at
/metrics and by `order-saga worker` on its own port. A scrape while the database cannot
be read still answers: `order_saga_database_up` 0 and everything but the SQL counts (the
breakers and calls are what an operator looks at then).

Under `serve --workers N` each process counts its own runs, and a scrape reaches one of
them: there `PROMETHEUS_MULTIPROC_DIR` is set (order_saga.server) before any process
imports prometheus_client, each writes its values to its own files there, and /metrics
sums them over all (`registry`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from functools import cache, partial
from typing import TYPE_CHECKING, TypeVar

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError

from fsm import subscriptions
from fsm.errors import StoreUnavailable
from fsm.machine import TERMINAL_ORDER_STATES, OrderState, Status

if TYPE_CHECKING:
    from fsm.store import Store

T = TypeVar("T")
log = logging.getLogger("order_saga.metrics")

TRANSITIONS = Counter("order_saga_transitions_total", "Committed transitions", ["scope", "trigger"])
CALLS = Counter(
    "order_saga_downstream_calls_total",
    "Downstream calls by final outcome (after retries)",
    ["service", "action", "outcome"],
)
RUN_SECONDS = Histogram("order_saga_run_seconds", "Duration of one executor run")
# Counted where it happens (the executor giving a held order back), not in SQL at each
# scrape: a count of orders.interruptions would scan the table, which has no index on it.
HELD = Counter(
    "order_saga_held_orders",
    "Orders held for an operator: their driver died ORDER_SAGA_MAX_INTERRUPTIONS times in a row",
)
# One attempt of one downstream call (each retry is observed on its own). Labelled, like
# every metric here and the breakers', by the downstream `service` (user, not payment).
CALL_SECONDS = Histogram(
    "order_saga_call_seconds",
    "Latency of one downstream call attempt, per service and action",
    ["service", "action"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

# Order events (fsm.relay): attempts per destination; pending, lag and dead letters are
# counted at scrape time (OutboxCollector).
OUTBOX_DELIVERIES = Counter(
    "order_saga_outbox_deliveries", "Events delivered, per destination", ["destination"]
)
OUTBOX_FAILURES = Counter(
    "order_saga_outbox_failures", "Failed delivery attempts, per destination", ["destination"]
)


def outbox_delivered(destination: str) -> Counter:
    return OUTBOX_DELIVERIES.labels(destination=destination)


def outbox_failed(destination: str) -> Counter:
    return OUTBOX_FAILURES.labels(destination=destination)


# Labelled children looked up once: `.labels()` takes a lock and builds a key per call.
@cache
def transition(scope: str, trigger: str) -> Counter:
    return TRANSITIONS.labels(scope=scope, trigger=trigger)


@cache
def call_outcome(service: str, action: str, outcome: str) -> Counter:
    return CALLS.labels(service=service, action=action, outcome=outcome)


@cache
def call_seconds(service: str, action: str) -> Histogram:
    return CALL_SECONDS.labels(service=service, action=action)


def timed(fn: Callable[[], Awaitable[T]], service: str, action: str) -> Callable[[], Awaitable[T]]:
    """`fn` observing its latency in `order_saga_call_seconds{service,action}` per call."""
    child = call_seconds(service, action)

    async def run() -> T:
        started = time.perf_counter()
        try:
            return await fn()
        finally:
            child.observe(time.perf_counter() - started)

    return run


CountByStatus = Callable[[], Mapping[str, int]]
OldestByState = Callable[[], Mapping[str, float]]
CountHeld = Callable[[], int]
LIVE_STATES = tuple(s.value for s in OrderState if s not in TERMINAL_ORDER_STATES)


class OrdersCollector(Collector):
    """`order_saga_orders{status}`: one SQL count per scrape, every status present; the
    parked count and, per non-terminal state, how long its oldest order has been still
    (what deploy/prometheus/order-saga.rules.yml alerts on)."""

    def __init__(
        self,
        count_by_status: CountByStatus,
        oldest: OldestByState | None,
        held: CountHeld | None = None,
    ) -> None:
        self.count_by_status = count_by_status
        self.oldest = oldest
        self.held = held

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(
            "order_saga_database_up",
            "1: this scrape read the database; 0: it could not, the SQL-counted families "
            "(orders, parked, oldest unmoved, outbox backlog) are left out",
        )
        try:
            counts = self.count_by_status()
            ages = self.oldest() if self.oldest is not None else None
            held = self.held() if self.held is not None else None
        except (StoreUnavailable, SQLAlchemyError) as exc:  # /healthz says why
            log.debug("orders not counted: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        family = GaugeMetricFamily(
            "order_saga_orders",
            "Orders by coarse status, counted at scrape time",
            labels=["status"],
        )
        for status in Status:
            family.add_metric([status.value], counts.get(status.value, 0))
        yield family
        parked = GaugeMetricFamily(
            "order_saga_parked_orders", "Orders in needs_attention, waiting for a person"
        )
        parked.add_metric([], counts.get(Status.NEEDS_ATTENTION.value, 0))
        yield parked
        if held is not None:
            # Alerts while it lasts, not only when one is held (order_saga_held_orders_total).
            now_held = GaugeMetricFamily(
                "order_saga_orders_held",
                "Live orders held for an operator (their driver died MAX_INTERRUPTIONS "
                "times in a row), counted at scrape time",
            )
            now_held.add_metric([], held)
            yield now_held
        if ages is None:
            return
        oldest = GaugeMetricFamily(
            "order_saga_oldest_unmoved_seconds",
            "Per non-terminal state: seconds since its longest-still order last moved (0: none)",
            labels=["state"],
        )
        for state in LIVE_STATES:
            oldest.add_metric([state], ages.get(state, 0.0))
        yield oldest


# destination name -> (undelivered events, age in seconds of the oldest of them (0: none),
# dead letters)
Backlog = Callable[[], Mapping[str, tuple[int, float, int]]]


class OutboxCollector(Collector):
    """`order_saga_outbox_pending{destination}`, `order_saga_outbox_lag_seconds
    {destination}` and `order_saga_outbox_dead{destination}`, counted in SQL at scrape
    time. A dead letter is in neither of the first two (the relay no longer tries it), so
    it has its own gauge: it holds its order's later events until an operator redelivers."""

    def __init__(self, backlog: Backlog) -> None:
        self.backlog = backlog

    def collect(self) -> Iterable[Metric]:
        found = self.backlog()
        pending = GaugeMetricFamily(
            "order_saga_outbox_pending",
            "Order events not yet delivered (dead letters excluded), per destination",
            labels=["destination"],
        )
        lag = GaugeMetricFamily(
            "order_saga_outbox_lag_seconds",
            "Age of the oldest undelivered order event, per destination (0: none)",
            labels=["destination"],
        )
        dead = GaugeMetricFamily(
            "order_saga_outbox_dead",
            "Dead-lettered order events (each holds its order's later ones), per destination",
            labels=["destination"],
        )
        for name, (count, seconds, dead_letters) in sorted(found.items()):
            pending.add_metric([name], count)
            lag.add_metric([name], seconds)
            dead.add_metric([name], dead_letters)
        yield pending
        yield lag
        yield dead


class _Process(Collector):
    """The process-wide default registry (counters, histograms, runtime) as one collector."""

    def collect(self) -> Iterable[Metric]:
        yield from REGISTRY.collect()


def registry(
    count_by_status: CountByStatus,
    backlog: Backlog | None = None,
    oldest: OldestByState | None = None,
    held: CountHeld | None = None,
) -> CollectorRegistry:
    """A registry serving this process's metrics (all `serve --workers` processes' when
    `PROMETHEUS_MULTIPROC_DIR` is set) plus the orders counted in `store`'s SQL; per app
    or worker, so several apps in one process (tests) never clash.

    Summed over processes, only what they write to the directory is served: counters,
    histograms and gauges, not the runtime's `process_*` and `python_*` (one process's
    memory or CPU, or its garbage collector, stands for none of the others)."""
    reg = CollectorRegistry(auto_describe=False)
    shared = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if shared:
        MultiProcessCollector(reg, path=shared)  # type: ignore[no-untyped-call]
    else:
        reg.register(_Process())
    reg.register(OrdersCollector(count_by_status, oldest, held))
    if backlog is not None:
        reg.register(OutboxCollector(backlog))
    return reg


def of_store(store: Store) -> CollectorRegistry:
    """What /metrics serves, the API's and `worker`'s alike: `registry` with the orders
    (by status, the oldest unmoved per state) and the order events' backlog counted in
    `store`'s SQL at each scrape."""
    return registry(
        store.count_by_status,
        partial(subscriptions.lags_if_known, store),
        store.oldest_unmoved_by_state,
        partial(store.count_held, store.max_interruptions),
    )


def exposition(
    count_by_status: CountByStatus,
    backlog: Backlog | None = None,
    oldest: OldestByState | None = None,
    held: CountHeld | None = None,
) -> bytes:
    """The Prometheus text format, counted now."""
    return generate_latest(registry(count_by_status, backlog, oldest, held))
