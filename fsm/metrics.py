"""Prometheus metrics of the orchestrator (exposed by the API at /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

TRANSITIONS = Counter("order_saga_transitions_total", "Committed transitions", ["scope", "trigger"])
CALLS = Counter(
    "order_saga_downstream_calls_total",
    "Downstream calls by final outcome (after retries)",
    ["service", "action", "outcome"],
)
RUN_SECONDS = Histogram("order_saga_run_seconds", "Duration of one executor run")
ORDERS = Gauge("order_saga_orders", "Orders by coarse status (read at scrape time)", ["status"])
