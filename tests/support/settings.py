"""The one way tests build the saga's settings. `saga_fields` names them (Settings field
names, one services URL for all four services); `saga_settings` makes the Settings of an
engine in the test process (FAST retries); `cli_settings` those a real `order-saga` given
`saga_env` runs with; `saga_env` the fields as ORDER_SAGA_* variables. No test writes
Settings(...) or ORDER_SAGA_* by hand for the saga it drives (tests of Settings' own
validation may)."""

from __future__ import annotations

import os
from typing import Any

from fsm.registry import SERVICES
from fsm.settings import Settings

# Retry budgets small enough for tests, still every branch of the policy; a short HTTP
# timeout so an injected "timeout" fault costs a second, not the default.
FAST: dict[str, Any] = {
    "max_attempts": 3,
    "backoff_base": 0.01,
    "backoff_max": 0.05,
    "step_deadline": 5,
    "http_timeout": 1.0,
}


def saga_fields(database_url: str, services_url: str | None, **fields: Any) -> dict[str, Any]:
    """Settings field names -> values: the database, every service at `services_url` (none
    given: the defaults, e.g. `serve`'s embedded services), then `fields`; None drops one."""
    values: dict[str, Any] = {"database_url": database_url}
    if services_url is not None:
        values |= {f"{service}_url": services_url for service in (s.name for s in SERVICES)}
    return {k: v for k, v in (values | fields).items() if v is not None}


def saga_settings(database_url: str, services_url: str | None = None, **fields: Any) -> Settings:
    """The settings an engine in the test process runs with: FAST unless `fields` say
    otherwise."""
    return Settings(**saga_fields(database_url, services_url, **(FAST | fields)))


def cli_settings(database_url: str, services_url: str | None = None, **fields: Any) -> Settings:
    """What `order-saga` run with `saga_env(...)` of the same arguments runs with: the
    Settings defaults but for `fields` (a command run in the test process, the app as
    deployed)."""
    return Settings(**saga_fields(database_url, services_url, **fields))


def saga_env(
    *, database_url: str, services_url: str | None = None, **fields: Any
) -> dict[str, str]:
    """A clean environment for `order-saga`: no ORDER_SAGA_* leaks in from the caller; the
    Settings defaults but for `fields` (lease_seconds=1 -> ORDER_SAGA_LEASE_SECONDS=1), as
    a user's process would run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORDER_SAGA_")}
    values = saga_fields(database_url, services_url, **fields)
    return env | {f"ORDER_SAGA_{k.upper()}": str(v) for k, v in values.items()}
