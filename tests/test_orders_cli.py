"""`order-saga orders list|show|cancel|resolve`, `--version` and `resume`'s exit code for
parked orders, as an operator runs them: real processes, real services, both databases."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import SQLModel

from downstream.seed import ORDINARY_USER_ID, SOLD_OUT_PRODUCT_ID, WIDGET_ID
from fsm.store import Store, make_engine
from order_saga import __version__
from tests.support.cursors import HAND_MADE_CURSORS, hand_made_cursor
from tests.support.processes import ORDER_SAGA
from tests.support.services import Downstream, set_faults
from tests.support.services import Fault as CrashFault
from tests.support.settings import saga_env

FAST = {"max_attempts": 2, "backoff_base": 0.01, "backoff_max": 0.05, "http_timeout": 3}
REFUND_DOWN = CrashFault("user.refund", "error")


def saga(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ORDER_SAGA, *args], capture_output=True, text=True, env=env, timeout=60)


def ok_json(*args: str, env: dict[str, str]) -> Any:
    result = saga(*args, "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def env(db_url: str, downstream: Downstream) -> dict[str, str]:
    return saga_env(database_url=db_url, services_url=downstream.url, **FAST)


def test_version() -> None:
    result = subprocess.run([ORDER_SAGA, "--version"], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout.strip()) == (0, f"order-saga {__version__}")


@pytest.mark.slow
async def test_park_then_list_show_and_resolve_from_the_cli(
    env: dict[str, str], store: Store, downstream: Downstream
) -> None:
    completed, _ = await store.create_order(
        user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1
    )
    stuck, _ = await store.create_order(
        user_id=ORDINARY_USER_ID, product_id=SOLD_OUT_PRODUCT_ID, quantity=1
    )  # sold out: compensates
    set_faults(downstream.url, [REFUND_DOWN])
    resumed = saga("resume", "--older-than", "0", env=env)
    set_faults(downstream.url, ())
    # exit 3: an order stayed parked, and why is printed
    assert resumed.returncode == 3, resumed.stdout + resumed.stderr
    assert f"still parked: {stuck.id}: payment refund did not succeed" in resumed.stderr
    assert "[1/2]" in resumed.stdout and "[2/2]" in resumed.stdout  # progress

    listed = ok_json("orders", "list", env=env)
    assert listed["total"] == 2
    assert [o["id"] for o in listed["orders"]] == [str(stuck.id), str(completed.id)]
    assert listed["orders"][0]["attention_reason"].startswith("payment refund")
    assert [o["id"] for o in listed["parked"]["orders"]] == [str(stuck.id)]  # apart, above
    assert listed["parked"]["total"] == 1
    only = ok_json("orders", "list", "--status", "completed", env=env)
    assert [o["id"] for o in only["orders"]] == [str(completed.id)]
    assert (
        ok_json("orders", "list", "--state", "needs_attention", "--older-than", "3600", env=env)[
            "orders"
        ]
        == []
    )
    table = saga("orders", "list", env=env)
    assert table.returncode == 0 and str(stuck.id) in table.stdout
    assert "needs_attention" in table.stdout and "payment refund" in table.stdout

    shown = ok_json("orders", "show", str(stuck.id), env=env)
    assert shown["status"] == "needs_attention"
    assert shown["steps"] == {
        "payment": "compensating",
        "inventory": "failed",
        "shipping": "compensated",
    }
    assert shown["timeline"][-1]["trigger"] == "park"
    assert [t["seq"] for t in shown["timeline"]] == list(range(1, len(shown["timeline"]) + 1))
    readable = saga("orders", "show", str(stuck.id), env=env)
    assert "needs attention:" in readable.stdout and "timeline" in readable.stdout

    cannot = saga("orders", "cancel", str(stuck.id), env=env)  # only completed orders
    assert cannot.returncode == 1 and "only a completed order" in cannot.stderr
    resolved = ok_json("orders", "resolve", str(stuck.id), "--reason", "refunded by hand", env=env)
    assert (resolved["state"], resolved["status"]) == ("resolved", "resolved")
    assert store.history(stuck.id)[-1].detail["reason"] == "refunded by hand"  # type: ignore[index]
    log = store.history(stuck.id)
    twice = saga("orders", "resolve", str(stuck.id), "--reason", "again", env=env)
    assert twice.returncode == 0, twice.stderr  # idempotent, as a cancel of a cancelled order
    assert twice.stdout.strip() == f"{stuck.id} resolved (resolved)"
    assert "was already resolved; nothing changed" in twice.stderr
    again = saga("orders", "resolve", str(stuck.id), "--reason", "again", "--json", env=env)
    assert again.returncode == 0 and json.loads(again.stdout)["state"] == "resolved"
    assert store.history(stuck.id) == log  # nothing written

    cancelled = ok_json("orders", "cancel", str(completed.id), env=env)
    assert cancelled["status"] == "cancelled"
    assert downstream.shipment(completed.id)["status"] == "cancelled"  # type: ignore[index]


async def test_a_bare_resume_takes_an_order_parked_a_moment_ago(
    env: dict[str, str], store: Store, downstream: Downstream
) -> None:
    """Right after an incident: `resume && echo drained` said drained (exit 0, resumed 0)
    while an order parked seconds before waited, skipped by the default `--older-than 60`.
    That guard leaves a live driver's orders alone; a parked order has none."""
    parked, _ = await store.create_order(
        user_id=ORDINARY_USER_ID, product_id=SOLD_OUT_PRODUCT_ID, quantity=1
    )  # sold out: compensates
    set_faults(downstream.url, [REFUND_DOWN])
    first = saga("resume", "--older-than", "0", env=env)
    set_faults(downstream.url, ())
    assert first.returncode == 3, first.stdout + first.stderr  # parked just now
    listed = saga("resume", "--dry-run", env=env)
    assert listed.returncode == 0 and "would resume 1" in listed.stdout, listed.stdout
    assert f"{parked.id} needs_attention: would resume; parked now:" in listed.stdout
    drained = saga("resume", env=env)
    assert drained.returncode == 0, drained.stdout + drained.stderr
    assert drained.stdout.splitlines()[-1].startswith("resumed 1, "), drained.stdout
    assert store.get(parked.id).status == "failed"  # refunded, restored: compensated


DEDUCT_DOWN = CrashFault("user.deduct", "error")


@pytest.mark.slow
async def test_resume_exits_4_while_an_order_is_still_running_or_held_by_another_driver(
    env: dict[str, str], store: Store, downstream: Downstream
) -> None:
    """`resume && echo drained` must not lie: exit 0 only when every order it selected
    ended terminal; one parked is 3; one still running (its retries spent before its
    step deadline) or held by another driver is 4; an error 1 (1 > 3 > 4 > 0)."""
    running, _ = await store.create_order(
        user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1
    )
    set_faults(downstream.url, [DEDUCT_DOWN])  # retried twice, well before STEP_DEADLINE
    still = saga("resume", "--older-than", "0", env=env)
    assert still.returncode == 4, still.stdout + still.stderr
    assert f"[1/1] {running.id} steps_running: running" in still.stdout
    assert f"not finished: {running.id} steps_running (running)" in still.stderr
    as_json = saga("resume", "--older-than", "0", "--json", env=env)
    assert as_json.returncode == 4, as_json.stderr
    assert json.loads(as_json.stdout)["not_finished"] == [str(running.id)]
    one = saga("resume", "--order", str(running.id), env=env)
    assert one.returncode == 4, one.stdout + one.stderr
    set_faults(downstream.url, ())

    # Held by another driver: skipped, so not drained either (bulk and --order alike).
    assert await store.claim(order_id=running.id, owner="another-driver") is not None
    held = saga("resume", "--older-than", "0", env=env)
    assert held.returncode == 4, held.stdout + held.stderr
    assert "skipped (leased elsewhere) 1" in held.stdout
    assert "held by another driver: 1 (not resumed)" in held.stderr
    one = saga("resume", "--order", str(running.id), env=env)
    assert one.returncode == 4 and "being driven by another worker" in one.stderr, one.stderr

    # Parked (3) outranks held elsewhere (4): the operator has work either way.
    stuck, _ = await store.create_order(
        user_id=ORDINARY_USER_ID, product_id=SOLD_OUT_PRODUCT_ID, quantity=1
    )
    set_faults(downstream.url, [REFUND_DOWN])
    both = saga("resume", "--older-than", "0", env=env)
    set_faults(downstream.url, ())
    assert both.returncode == 3, both.stdout + both.stderr
    assert f"still parked: {stuck.id}" in both.stderr
    assert "held by another driver: 1" in both.stderr

    # A dry run changes nothing and says so: the parked order would be retried, and
    # nothing is "still parked" (nothing was tried).
    dry = saga("resume", "--older-than", "0", "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert f"{stuck.id} needs_attention: would resume; parked now: payment refund" in dry.stdout
    assert "still parked" not in dry.stderr
    dry_json = json.loads(
        saga("resume", "--older-than", "0", "--dry-run", "--json", env=env).stdout
    )
    assert dry_json["still_parked"] == [] and dry_json["parked_now"] == [str(stuck.id)]
    dry_one = saga("resume", "--order", str(stuck.id), "--dry-run", env=env)
    assert dry_one.returncode == 0 and "still parked" not in dry_one.stderr
    assert "would resume; parked now: payment refund" in dry_one.stdout

    await store.release(
        order_id=running.id, owner="another-driver", version=store.get(running.id).version
    )
    drained = saga("resume", "--older-than", "0", env=env)
    assert drained.returncode == 0, drained.stdout + drained.stderr
    assert store.get(running.id).status == "completed"
    assert store.get(stuck.id).status == "failed"


def _pages(env: dict[str, str], *, between: Any = None) -> tuple[list[str], list[str]]:
    """`orders list --limit 1` page after page: the parked shown above page one, and the
    ids of every page; `between()` runs after page one."""
    first = ok_json("orders", "list", "--limit", "1", env=env)
    parked = [o["id"] for o in first["parked"]["orders"]]
    seen, cursor = [o["id"] for o in first["orders"]], first["next_cursor"]
    if between is not None:
        between()
    while cursor:
        page = ok_json("orders", "list", "--limit", "1", "--cursor", cursor, env=env)
        assert page["parked"] is None  # the first page's only
        seen += [o["id"] for o in page["orders"]]
        cursor = page["next_cursor"]
    return parked, seen


@pytest.mark.slow
async def test_cursor_pages_show_every_order_once_while_one_is_parked_or_resolved(
    env: dict[str, str], store: Store, downstream: Downstream
) -> None:
    """The pages' key was (parked first, newest first, id): an order parked after page
    one sorted before the cursor and was never shown, one resolved meanwhile came again.
    Now a cursor pages by (created_at, id), which never change; the parked orders are
    shown apart, above the first page."""
    stuck, _ = await store.create_order(
        user_id=ORDINARY_USER_ID, product_id=SOLD_OUT_PRODUCT_ID, quantity=1
    )  # the oldest: on the last page
    made = [
        (await store.create_order(user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1))[0]
        for _ in range(2)
    ]
    every = sorted(str(o.id) for o in [stuck, *made])

    def park() -> None:  # the sweep: sold out, and the refund down past its budget
        set_faults(downstream.url, [REFUND_DOWN])
        assert saga("resume", "--older-than", "0", env=env).returncode == 3
        set_faults(downstream.url, ())

    parked, seen = _pages(env, between=park)
    assert parked == [] and sorted(seen) == every, seen  # none lost, none twice

    def resolve() -> None:  # an operator, while someone pages
        resolved = saga("orders", "resolve", str(stuck.id), "--reason", "by hand", env=env)
        assert resolved.returncode == 0, resolved.stderr

    parked, seen = _pages(env, between=resolve)
    assert parked == [str(stuck.id)] and sorted(seen) == every, seen


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["orders", "show", "nope"], 2, "is not an order id"),
        (["orders", "show", "00000000-0000-0000-0000-000000000000"], 1, "not found"),
        (["orders", "resolve", "00000000-0000-0000-0000-000000000000"], 2, "--reason"),
        (
            ["orders", "resolve", "00000000-0000-0000-0000-000000000000", "--reason", " "],
            2,
            "empty",
        ),
        (["orders", "list", "--status", "lost"], 2, "Invalid value for '--status'"),
        (["orders", "cancel", "00000000-0000-0000-0000-000000000000"], 1, "not found"),
        # Hand-made cursors, each once a traceback.
        *(
            (["orders", "list", "--cursor", hand_made_cursor(HAND_MADE_CURSORS[name])], 2, why)
            for name, why in [
                ("infinite flag", "is not a cursor"),
                ("id a list", "is not a cursor"),
                ("flag too big for sqlite", "is not a cursor"),
            ]
        ),
        (["orders", "list", "--id", "-"], 2, "is not the start of an order id"),
    ],
)
def test_bad_input_is_one_line(
    tmp_path: Path, services_url: str, args: list[str], code: int, message: str
) -> None:
    url = f"sqlite:///{tmp_path}/saga.db"  # no storage behaviour here: one database will do
    engine = make_engine(url)
    SQLModel.metadata.create_all(engine)
    engine.dispose()
    result = saga(*args, env=saga_env(database_url=url, services_url=services_url))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr
    assert len(lines) == 1 and lines[0].startswith("order-saga: ") and message in lines[0], lines
