"""The saga's steps, one row each: what a step is called, which downstream service performs
it, its forward and undo actions, the adapter pairing the two calls, and the column holding
its state. Everything else that lists the steps is derived from `STEPS`: the step machine's
edges and the design table (`fsm.machine`), the state columns and the SQL (`fsm.models`,
`fsm.sql`), the service clients, breakers and URLs (`fsm.clients`, `fsm.breaker`,
`fsm.settings`), the machine version (`fsm.version`), the API and the tests.

Order matters: it is the order the steps are listed in everywhere (the API, the diagram,
the design table's columns). Data only: no I/O, no decisions.

A step can also be plugged in without editing this file: ORDER_SAGA_STEP_MODULES names
modules (comma-separated) whose own `STEPS` rows are appended at import, before anything
is derived from the rows (tests/test_fourth_step.py adds a fourth step so; its column
still needs its migration).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fsm.clients import (
    HttpInventoryService,
    HttpProductService,
    HttpService,
    HttpShippingService,
    HttpUserService,
)
from fsm.steps import Inventory, Payment, SagaStep, Shipping

__all__ = [
    "PRODUCT_SERVICE",
    "SERVICES",
    "STEP",
    "STEPS",
    "STEP_NAMES",
    "Service",
    "StepRow",
    "bind",
]


@dataclass(frozen=True)
class StepRow:
    """One step of the saga."""

    name: str  # its scope in the transition log, its key in the API's `steps`
    service: str  # the downstream service that performs it (a URL, a client, a breaker)
    forward: str  # action names: idempotency keys ({order}:{step}:{action}), diagram labels
    undo: str
    adapter: Callable[[Any], SagaStep]  # given the service's client: forward and undo, typed
    client: type[HttpService]  # the service's HTTP client (`fsm.clients`)

    @property
    def column(self) -> str:
        """The orders table's column holding this step's state."""
        return f"{self.name}_state"


@dataclass(frozen=True)
class Service:
    """One downstream service and its HTTP client."""

    name: str  # ORDER_SAGA_<NAME>_URL, a key of ORDER_SAGA_SERVICES, its breaker's label
    client: type[HttpService]


STEPS: tuple[StepRow, ...] = (
    StepRow("payment", "user", "deduct", "refund", Payment, HttpUserService),
    StepRow("inventory", "inventory", "deduct", "restore", Inventory, HttpInventoryService),
    StepRow("shipping", "shipping", "schedule", "cancel", Shipping, HttpShippingService),
)

# Looked up before the steps start: not a step, never compensated.
PRODUCT_SERVICE = Service("product", HttpProductService)


def _plugged_in(modules: str) -> tuple[StepRow, ...]:
    rows: list[StepRow] = []
    for name in filter(None, (m.strip() for m in modules.split(","))):
        rows.extend(importlib.import_module(name).STEPS)
    return tuple(rows)


STEPS += _plugged_in(os.environ.get("ORDER_SAGA_STEP_MODULES", ""))
if len({row.name for row in STEPS}) != len(STEPS):
    raise ValueError(f"two steps share a name: {[row.name for row in STEPS]}")

STEP_NAMES: tuple[str, ...] = tuple(row.name for row in STEPS)
STEP: dict[str, StepRow] = {row.name: row for row in STEPS}
# Every downstream service, the product's first, then each step's (in the steps' order).
SERVICES: tuple[Service, ...] = (
    PRODUCT_SERVICE,
    *{row.service: Service(row.service, row.client) for row in STEPS}.values(),
)


def bind(clients: Callable[[str], Any]) -> dict[str, SagaStep]:
    """Every step, in order, bound to its service's client (`clients(service name)`)."""
    return {row.name: row.adapter(clients(row.service)) for row in STEPS}
