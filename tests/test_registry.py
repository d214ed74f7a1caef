"""The step registry (issue 21): a step is one row, and what lists the steps follows it.

The machine version hashes the rows; the service URLs are a per-service map in which a
missing or unknown service is refused at start-up; a step added after an order ran its
steps (its column defaulting to `pending`) neither runs nor is undone for that order, and
`check-upgrade` says so; README's "Adding a step" names files that exist.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import insert

from downstream.seed import ORDINARY_USER_ID, WIDGET_ID
from fsm.executor import Executor
from fsm.models import OrderTable
from fsm.registry import SERVICES, STEPS
from fsm.settings import Settings
from fsm.store import Store
from fsm.upgrade import check
from fsm.version import MACHINE_VERSION, Tables
from tests.support.services import Downstream

REPO = Path(__file__).resolve().parent.parent
URL = "http://127.0.0.1:9"
NAMES = [service.name for service in SERVICES]


def settings(**fields: Any) -> Settings:
    """Settings themselves, built by hand: what their validation accepts and refuses."""
    return Settings(**fields)


# -- the machine version ---------------------------------------------------------------


def test_the_version_changes_when_a_step_is_added_removed_renamed_or_moved() -> None:
    installed = Tables.installed()
    assert installed.version == MACHINE_VERSION
    steps = installed.steps
    loyalty = ("loyalty", "loyalty", "award", "revoke")
    variants = {
        "added": (*steps, loyalty),
        "removed": steps[:-1],
        "renamed": ((f"{steps[0][0]}_v2", *steps[0][1:]), *steps[1:]),
        "new undo": ((*steps[0][:3], "void"), *steps[1:]),
        "reordered": tuple(reversed(steps)),
    }
    versions = {name: replace(installed, steps=rows).version for name, rows in variants.items()}
    assert MACHINE_VERSION not in versions.values()
    assert len(set(versions.values())) == len(versions)


# -- settings: one URL per service -----------------------------------------------------


def test_services_map_and_the_per_service_variables_give_the_same_settings() -> None:
    by_map = settings(services=dict.fromkeys(NAMES, URL + "/"))
    by_name = settings(**{f"{name}_url": URL for name in NAMES})
    assert by_map.services == by_name.services == dict.fromkeys(NAMES, URL)
    assert not by_map.embedded_services
    assert settings().embedded_services and settings().services == {}


def test_the_per_service_environment_variables_still_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in NAMES:
        monkeypatch.setenv(f"ORDER_SAGA_{name.upper()}_URL", URL)
    assert settings().services == dict.fromkeys(NAMES, URL)


def test_a_service_without_a_url_is_refused_when_others_have_one() -> None:
    *some, left_out = NAMES
    with pytest.raises(ValidationError, match=f"ORDER_SAGA_{left_out.upper()}_URL"):
        settings(services=dict.fromkeys(some, URL))


def test_an_unknown_service_is_refused() -> None:
    with pytest.raises(ValidationError, match="unknown service loyalty"):
        settings(services={**dict.fromkeys(NAMES, URL), "loyalty": URL})


def test_a_url_that_is_not_http_names_its_variable() -> None:
    with pytest.raises(ValidationError, match=f"ORDER_SAGA_{NAMES[1].upper()}_URL must be"):
        settings(services={**dict.fromkeys(NAMES, URL), NAMES[1]: "ftp://x"})


# -- a step added after an order ran its steps -----------------------------------------


def put_parked_after_the_join(store: Store, added: str) -> uuid.UUID:
    """An order compensating its one success (the last step), its first step failed, and
    `added` still at the migration's default, as if that step came with a later deploy."""
    states = dict.fromkeys((row.name for row in STEPS), "failed")
    states |= {STEPS[-1].name: "succeeded", added: "pending"}
    now = datetime.now(UTC)
    row = {
        "id": uuid.uuid4(),
        "user_id": ORDINARY_USER_ID,
        "product_id": WIDGET_ID,
        "quantity": 1,
        "amount": 100,
        "state": "compensating",
        "status": "compensating",
        **{f"{name}_state": state for name, state in states.items()},
        "version": 0,
        "attempts": {},
        "cancel_requested": False,
        "created_at": now,
        "updated_at": now,
        "machine_version": "0ld0ld0ld0ld",
    }
    with store.engine.begin() as conn:
        conn.execute(insert(OrderTable.__table__), [row])  # type: ignore[attr-defined]
    return row["id"]  # type: ignore[return-value]


async def test_a_step_added_later_is_neither_run_nor_undone_past_the_join(
    store: Store, executor: Executor, downstream: Downstream
) -> None:
    added = STEPS[0].name
    order_id = put_parked_after_the_join(store, added)

    report = check(store.engine)
    assert report.ok
    assert any(added in note and "never run, never undone" in note for note in report.notes)

    final = await executor.run(order_id)
    assert final.state == "failed"
    assert final.state_of(added) == "pending"  # not resurrected
    assert final.state_of(STEPS[-1].name) == "compensated"
    assert not [t for t in store.history(order_id) if t.scope == added]
    assert not [k for k in downstream.effects() if k.startswith(f"{order_id}:{added}:")]


# -- README ------------------------------------------------------------------------------


def test_the_readme_section_on_adding_a_step_names_what_exists() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Adding a step", 1)[1].split("\n## ", 1)[0]
    paths = re.findall(r"`((?:fsm|downstream|migrations|tests)/[\w/.]+\.py)`", section)
    assert paths and all((REPO / p).is_file() for p in paths), paths
    assert "fsm/registry.py" in paths and "tests/test_one_source.py" in paths
