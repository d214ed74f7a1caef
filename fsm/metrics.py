"""Prometheus metrics of the orchestrator (exposed by the API at /metrics)."""

from __future__ import annotations

from functools import cache

from prometheus_client import Counter, Gauge, Histogram

TRANSITIONS = Counter("order_saga_transitions_total", "Committed transitions", ["scope", "trigger"])
CALLS = Counter(
    "order_saga_downstream_calls_total",
    "Downstream calls by final outcome (after retries)",
    ["service", "action", "outcome"],
)
RUN_SECONDS = Histogram("order_saga_run_seconds", "Duration of one executor run")
ORDERS = Gauge("order_saga_orders", "Orders by coarse status (read at scrape time)", ["status"])


# Labelled children looked up once: `.labels()` takes a lock and builds a key per call.
@cache
def transition(scope: str, trigger: str) -> Counter:
    return TRANSITIONS.labels(scope=scope, trigger=trigger)


@cache
def call_outcome(service: str, action: str, outcome: str) -> Counter:
    return CALLS.labels(service=service, action=action, outcome=outcome)
