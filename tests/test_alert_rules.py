"""deploy/prometheus/order-saga.rules.yml: valid rule groups, and every metric an alert
names is one the orchestrator exports, with the labels the alert groups by. With promtool
on PATH (Debian's `prometheus` package, or ORDER_SAGA_PROMTOOL), also `promtool check rules`
and the rule unit tests of order-saga.rules.test.yml; without it, the parse and sanity
checks here stand alone."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

from fsm import metrics
from fsm.breaker import Breakers

RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "order-saga.rules.yml"
RULE_TESTS = RULES.with_name("order-saga.rules.test.yml")
# On PATH, or where `make test` puts it (scripts/ensure-promtool.sh: the virtualenv's bin/).
PROMTOOL = (
    os.environ.get("ORDER_SAGA_PROMTOOL")
    or shutil.which("promtool")
    or shutil.which("promtool", path=str(Path(sys.executable).parent))
)
DOC = yaml.safe_load(RULES.read_text())
ALERTS: list[dict[str, Any]] = [rule for group in DOC["groups"] for rule in group["rules"]]
WORDS = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def exported() -> str:
    Breakers()["user.deduct"]  # a breaker: its gauge has a sample with its `operation`
    return metrics.exposition(
        lambda: {"needs_attention": 2},
        backlog=lambda: {"billing-hook": (3, 420.0, 2)},
        oldest=lambda: {"compensating": 42.0},
        held=lambda: 1,
    ).decode()


def test_the_file_is_rule_groups() -> None:
    assert [g["name"] for g in DOC["groups"]] == ["order-saga"]
    names = [rule["alert"] for rule in ALERTS]
    assert len(names) == len(set(names)) >= 4
    # issue 18 §5: stuck orders, parked orders, an open breaker, outbox lag; dead letters
    assert {"OrderSagaStuckOrders", "OrderSagaParkedOrders", "OrderSagaBreakerOpen"} <= set(names)
    assert {"OrderSagaOutboxLag", "OrderSagaOutboxDeadLetters"} <= set(names)
    for rule in ALERTS:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert rule["labels"]["severity"] in {"page", "ticket"}
        assert rule["annotations"]["summary"]
        assert rule["expr"].count("(") == rule["expr"].count(")")
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"])


def labels_of(name: str, text: str) -> set[str]:
    """The label names a metric carries: from its samples, or (a labelled counter with no
    sample yet in this process) from its declaration."""
    found = set()
    for labels in re.findall(rf"^{name}(?:_total)?{{([^}}]*)}}", text, re.MULTILINE):
        found |= set(re.findall(r"([a-z_]+)=", labels))
    declared = REGISTRY._names_to_collectors.get(name)  # noqa: SLF001
    return found | set(getattr(declared, "_labelnames", ()))


@pytest.mark.parametrize("rule", ALERTS, ids=[r["alert"] for r in ALERTS])
def test_every_metric_an_alert_reads_is_exported(rule: dict[str, Any]) -> None:
    text = exported()
    typed = set(re.findall(r"^# TYPE (order_saga_[a-z_]+) ", text, re.MULTILINE))
    named = {w for w in WORDS.findall(rule["expr"]) if w.startswith("order_saga_")}
    assert named, rule["expr"]
    for name in named:
        assert name.removesuffix("_total") in typed or name in typed, f"{name} not exported"
        used = set(re.findall(r"by \(([a-z_]+)\)", rule["expr"]))
        used |= set(re.findall(r"\b([a-z_]+)!?=~?\"", rule["expr"]))
        assert used <= labels_of(name, text), (name, used)


def test_the_stuck_and_parked_gauges_carry_what_the_rules_need() -> None:
    text = exported()
    assert "order_saga_parked_orders 2.0" in text
    assert 'order_saga_oldest_unmoved_seconds{state="compensating"} 42.0' in text
    assert 'order_saga_oldest_unmoved_seconds{state="pending"} 0.0' in text  # none: 0
    assert 'order_saga_oldest_unmoved_seconds{state="completed"}' not in text  # terminal


def test_the_outbox_lag_rule_reads_the_lag_per_destination() -> None:
    """The lag gauge as the relay's collector exports it, and a rule on it per destination."""
    text = exported()
    assert 'order_saga_outbox_lag_seconds{destination="billing-hook"} 420.0' in text
    (rule,) = [r for r in ALERTS if r["alert"] == "OrderSagaOutboxLag"]
    assert re.fullmatch(
        r"max by \(destination\) \(order_saga_outbox_lag_seconds\) > \d+", rule["expr"]
    ), rule["expr"]
    assert "{{ $labels.destination }}" in rule["annotations"]["summary"]


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed")
@pytest.mark.parametrize(
    "check", [["check", "rules", str(RULES)], ["test", "rules", str(RULE_TESTS)]]
)
def test_promtool_accepts_the_rules(check: list[str]) -> None:
    assert PROMTOOL is not None
    done = subprocess.run([PROMTOOL, *check], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_dead_letter_rule_reads_the_dead_letters_per_destination() -> None:
    """Dead letters are in no lag (the relay no longer tries them): their own gauge, and a
    rule on it, so a destination that refuses every event does not go unnoticed."""
    text = exported()
    assert 'order_saga_outbox_dead{destination="billing-hook"} 2.0' in text
    (rule,) = [r for r in ALERTS if r["alert"] == "OrderSagaOutboxDeadLetters"]
    assert rule["expr"] == "max by (destination) (order_saga_outbox_dead) > 0"
    assert "{{ $labels.destination }}" in rule["annotations"]["summary"]
