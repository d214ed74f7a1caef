"""Issue 10, part 1: the machine version, `check-upgrade`, the start-up guard of the sweep,
and a state migration proved end to end, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from alembic import command
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from sqlalchemy import insert, select, text, update

from api.app import create_app
from downstream.seed import ORDINARY_USER_ID, SOLD_OUT_PRODUCT_ID, WIDGET_ID
from fsm.clients import Services
from fsm.executor import Executor
from fsm.machine import ORDER_TRANSITIONS, STEP_TRANSITIONS, OrderState, coarse_status
from fsm.migrate import alembic_config, migrate, schema, upgrade
from fsm.models import OrderTable
from fsm.store import Store, make_engine
from fsm.upgrade import Tables, check, guard
from fsm.version import MACHINE_VERSION, version_of
from fsm.wiring import open_saga
from tests.support.database import create_pg_database, drop_pg_database
from tests.support.processes import ORDER_SAGA, Saga, run_cli
from tests.support.services import Downstream, free_port
from tests.support.settings import cli_settings, saga_env, saga_settings
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
KNOWN = {s.value for s in OrderState}
orders = OrderTable.__table__  # type: ignore[attr-defined]


def check_upgrade(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("check-upgrade", *args, ORDER_SAGA_DATABASE_URL=db_url)


# -- the version -----------------------------------------------------------------------


def test_the_version_names_the_tables_not_their_order() -> None:
    installed = Tables.installed()
    assert installed.version == MACHINE_VERSION
    assert len(MACHINE_VERSION) == 12 and int(MACHINE_VERSION, 16) >= 0
    shuffled = version_of(
        order_states=sorted(installed.order_states, reverse=True),
        order_terminal=installed.order_terminal,
        order_edges=list(reversed(ORDER_TRANSITIONS)),
        step_states=installed.step_states,
        step_edges=list(reversed(STEP_TRANSITIONS)),
        steps=installed.steps,
    )
    assert shuffled == MACHINE_VERSION
    assert installed.renamed("order", "needs_attention", "parked").version != MACHINE_VERSION
    assert installed.renamed("step", "expired", "timed_out").version != MACHINE_VERSION
    fewer = replace(installed, order_edges=installed.order_edges[1:])
    assert fewer.version != MACHINE_VERSION


async def test_orders_and_transitions_record_the_version(
    store: Store, executor: Executor, downstream: Downstream
) -> None:
    order, _ = await store.create_order(
        user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1, owner=executor.owner
    )
    assert store.get(order.id).machine_version == MACHINE_VERSION
    await executor.drive(order)
    history = store.history(order.id)
    assert len(history) >= 9 and {t.machine_version for t in history} == {MACHINE_VERSION}


def test_diagram_prints_the_version_on_stderr() -> None:
    result = run_cli("diagram")
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == f"machine version {MACHINE_VERSION}"
    assert result.stdout.startswith("stateDiagram-v2")


# -- the check -------------------------------------------------------------------------


def put(store: Store, state: str, steps: tuple[str, str, str], n: int = 1) -> list[uuid.UUID]:
    """Orders as a release's rows would hold them (the check reads nothing else)."""
    now = datetime.now(UTC)
    pay, inv, ship = steps
    rows = [
        {
            "id": uuid.uuid4(),
            "user_id": ORDINARY_USER_ID,
            "product_id": WIDGET_ID,
            "quantity": 1,
            "state": state,
            "status": coarse_status(state).value if state in KNOWN else "running",
            "payment_state": pay,
            "inventory_state": inv,
            "shipping_state": ship,
            "version": 0,
            "attempts": {},
            "cancel_requested": False,
            "created_at": now,
            "updated_at": now,
            "machine_version": MACHINE_VERSION,
        }
        for _ in range(n)
    ]
    with store.engine.begin() as conn:
        conn.execute(insert(orders), rows)
    return [row["id"] for row in rows]


def test_check_passes_on_live_orders_the_machine_drives(store: Store, db_url: str) -> None:
    put(store, "steps_running", ("requested", "succeeded", "pending"), 3)
    put(store, "needs_attention", ("compensating", "failed", "compensated"), 2)
    put(store, "completed", ("succeeded", "succeeded", "succeeded"), 4)  # terminal: not read
    report = check(store.engine)
    assert report.ok and report.live == 5 and report.groups == 2
    result = check_upgrade(db_url)
    assert result.returncode == 0, result.stdout + result.stderr
    # The tests' schema is made without Alembic: no revision recorded.
    behind = "database at revision none, behind this release's head"
    summary, revision = result.stdout.strip().splitlines()
    assert summary == report.summary() and revision.startswith(behind)


def test_check_names_every_order_a_new_machine_would_strand(store: Store, db_url: str) -> None:
    parked = put(store, "needs_attention", ("compensating", "failed", "compensated"), 2)
    put(store, "steps_running", ("requested", "requested", "requested"))
    renamed = Tables.installed().renamed("order", "needs_attention", "parked")
    report = check(store.engine, renamed, with_ids=10)
    assert not report.ok and report.stranded_orders == 2
    (entry,) = report.by_state()["needs_attention"]
    assert entry["reasons"] == ["order state 'needs_attention' is not a state of this machine"]
    assert sorted(entry["orders"]) == sorted(map(str, parked))

    # An edge removed: the state still exists, but no path leads to a terminal state.
    installed = Tables.installed()
    edges = tuple(e for e in installed.order_edges if e[1] != "steps_running")
    dead_end = replace(installed, order_edges=edges)
    (group, why) = check(store.engine, dead_end).stranded[0]
    assert group.state == "steps_running"
    assert why == ["no declared path from order state 'steps_running' to a terminal state"]


def test_check_upgrade_cli_exit_1_and_json(store: Store, db_url: str) -> None:
    lost = put(store, "steps_running", ("requested", "lost", "requested"))  # unknown step state
    result = check_upgrade(db_url)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0] == f"would strand 1 of 1 live orders under machine {MACHINE_VERSION}"
    assert lines[1].startswith("database at revision ")
    assert lines[2] == "state steps_running: 1 orders"
    assert "inventory state 'lost' is not a state of this machine" in lines[3]
    assert lines[4].strip() == str(lost[0])
    as_json = check_upgrade(db_url, "--json")
    assert as_json.returncode == 1
    document = json.loads(as_json.stdout)
    assert document["ok"] is False and document["stranded_orders"] == 1
    assert document["stranded"]["steps_running"][0]["orders"] == [str(lost[0])]


def test_check_upgrade_on_an_unreachable_database_is_one_line() -> None:
    result = check_upgrade("postgresql+psycopg://postgres@127.0.0.1:1/nothing")
    assert result.returncode == 1
    assert result.stderr.startswith("order-saga: cannot read the database")
    assert len(result.stderr.strip().splitlines()) == 1


async def test_the_sweep_skips_what_the_machine_cannot_drive(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    (lost,) = put(store, "steps_running", ("requested", "lost", "requested"))
    (fine,) = put(store, "pending", ("pending", "pending", "pending"))
    before = store.get(fine).version
    with caplog.at_level(logging.INFO, logger="order_saga.upgrade"):
        skipped = guard(store)
    assert skipped == {("steps_running", "requested", "lost", "requested")}
    assert REGISTRY.get_sample_value("order_saga_undrivable_orders") == 1
    errors = [r for r in caplog.records if r.name == "order_saga.upgrade"]
    assert len(errors) == 1 and "inventory state 'lost'" in errors[0].getMessage()
    later = datetime.now(UTC) + timedelta(seconds=1)
    found = await store.claim_batch(owner="t", moved_before=later, limit=10, due_only=False)
    assert [o.id for o in found] == [fine]  # the undrivable order is not even claimed
    assert store.get(fine).version == before
    assert store.get(fine).lease_owner == "t"
    with store.engine.connect() as conn:
        row = conn.execute(select(orders.c.inventory_state).where(orders.c.id == lost)).one()
    assert row.inventory_state == "lost"  # never rewritten


# -- migrations ------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def migrated(request: pytest.FixtureRequest, tmp_path: Path, worker_id: str) -> Iterator[str]:
    """An empty database at revision 0001 (callers upgrade on)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/upgrade.db"
        upgrade(url, "0001")
        yield url
        return
    name = f"order_saga_upgrade_{worker_id}_{os.getpid()}"
    url = create_pg_database(name)
    upgrade(url, "0001")
    yield url
    drop_pg_database(name)


def test_revision_0002_gives_existing_rows_the_current_version(migrated: str) -> None:
    engine = make_engine(migrated)
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO orders (id, user_id, product_id, quantity, state, status,"
                " payment_state, inventory_state, shipping_state, version, attempts,"
                " cancel_requested, created_at, updated_at) VALUES (:id, 1, 1, 1, 'pending',"
                " 'pending', 'pending', 'pending', 'pending', 0, '{}', false, :now, :now)"
            ),
            {"id": uuid.uuid4().hex if migrated.startswith("sqlite") else uuid.uuid4(), "now": now},
        )
    upgrade(migrated)
    with engine.connect() as conn:
        assert conn.execute(select(orders.c.machine_version)).scalars().all() == [MACHINE_VERSION]
    engine.dispose()


async def test_a_renamed_state_migrates_and_the_orders_finish(
    migrated: str, services: Services, downstream: Downstream
) -> None:
    """Orders parked under a release that called the state `awaiting_operator`; this
    release (the installed machine) calls it `needs_attention`."""
    upgrade(migrated)
    async with open_saga(saga_settings(migrated), services=services) as saga:
        store, executor = saga.store, saga.executor
        balance, stock = downstream.balance(ORDINARY_USER_ID), downstream.stock(SOLD_OUT_PRODUCT_ID)
        downstream.fault("user.refund", "error", count=1000)
        ids = []
        for _ in range(3):  # paid, sold out -> refund fails all run long -> parked
            order, _ = await store.create_order(
                user_id=ORDINARY_USER_ID,
                product_id=SOLD_OUT_PRODUCT_ID,
                quantity=1,
                owner=executor.owner,
            )
            await executor.drive(order)
            assert store.get(order.id).state == "needs_attention"
            ids.append(order.id)
        old = Tables.installed().renamed("order", "needs_attention", "awaiting_operator")
        with store.engine.begin() as conn:  # as the previous release wrote them
            conn.execute(
                update(orders)
                .where(orders.c.state == "needs_attention")
                .values(state="awaiting_operator", machine_version=old.version)
            )

        assert check(store.engine, old).ok  # the old release could drive them
        failing = check_upgrade(migrated)
        assert failing.returncode == 1
        assert "state awaiting_operator: 3 orders" in failing.stdout
        assert all(str(oid) in failing.stdout for oid in ids)

        config = alembic_config(migrated)
        locations = [ROOT / "migrations" / "versions", ROOT / "tests" / "upgrade_revisions"]
        config.set_main_option("version_locations", os.pathsep.join(map(str, locations)))
        command.upgrade(config, "heads")

        passing = check_upgrade(migrated)
        assert passing.returncode == 0, passing.stdout
        assert store.get(ids[0]).machine_version == MACHINE_VERSION
        httpx.delete(f"{downstream.url}/_faults").raise_for_status()
        for oid in ids:
            assert (await executor.run(oid)).status == "failed"
        assert downstream.balance(ORDINARY_USER_ID) == balance  # charged, then refunded once each
        assert downstream.stock(SOLD_OUT_PRODUCT_ID) == stock
        assert all(n == 1 for n in downstream.effects().values())
        history = store.history(ids[0])
        parked = [t for t in history if t.trigger == "park"]
        assert parked and parked[0].to_state == "needs_attention"  # the log keeps what was written
        assert history[-1].trigger == "compensation_done"


# -- a rolling deploy: the database one release ahead --------------------------------------

NEXT_RELEASE = "0012_next_release"  # a revision this release does not ship: the next one's


def as_if_the_next_release_migrated(url: str, *ddl: str) -> None:
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": NEXT_RELEASE})
        for statement in ddl:
            conn.execute(text(statement))
    engine.dispose()


def test_a_database_the_next_release_migrated_is_left_as_it_is_and_said(migrated: str) -> None:
    """The deploy order runs the next release's `db upgrade` while this one still runs: a
    `serve` of this release (re)started then must start on it, not crash-loop."""
    upgrade(migrated)
    (head,) = schema(migrated).head
    as_if_the_next_release_migrated(migrated)

    assert migrate(migrated).ahead  # what `serve` runs at start: nothing applied, no error
    upgraded = run_cli("db", "upgrade", ORDER_SAGA_DATABASE_URL=migrated)
    assert upgraded.returncode == 0, upgraded.stderr
    ahead = f"database at revision {NEXT_RELEASE}, ahead of this release's head {head}"
    assert ahead in upgraded.stdout
    checked = check_upgrade(migrated)
    assert checked.returncode == 0, checked.stdout
    assert checked.stdout.startswith("ok: machine") and ahead in checked.stdout
    revisions = json.loads(check_upgrade(migrated, "--json").stdout)["schema"]
    assert revisions["database_revision"] == [NEXT_RELEASE] and revisions["ahead"]
    assert revisions["head_revision"] == [head]
    assert schema(migrated).database == (NEXT_RELEASE,)  # nobody rewrote it


def test_a_newer_schema_that_lacks_a_column_this_release_uses_is_refused_in_one_line(
    migrated: str,
) -> None:
    upgrade(migrated)
    as_if_the_next_release_migrated(
        migrated, "ALTER TABLE orders RENAME COLUMN amount TO amount_cents"
    )
    for args in (["serve", "--port", str(free_port())], ["db", "upgrade"], ["check-upgrade"]):
        result = run_cli(*args, ORDER_SAGA_DATABASE_URL=migrated)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        out = (result.stdout + result.stderr).strip()
        assert len(out.splitlines()) == 1 and "lacks orders.amount that this release" in out
        assert "run the release that migrated it" in out


def test_serve_no_migrate_refuses_a_database_behind_this_release(migrated: str) -> None:
    result = run_cli(
        "serve", "--port", str(free_port()), "--no-migrate", **{"ORDER_SAGA_DATABASE_URL": migrated}
    )
    assert result.returncode == 1
    assert "database at revision 0001, behind this release's head" in result.stderr
    assert "run `order-saga db upgrade` first" in result.stderr
    assert schema(migrated).database == ("0001",)  # not migrated


# -- serve and worker run the check at start -------------------------------------------


@pytest.mark.slow
def test_worker_skips_undrivable_orders_and_drives_the_rest(
    db_url: str, store: Store, downstream: Downstream
) -> None:
    (lost,) = put(store, "steps_running", ("requested", "lost", "requested"))
    fine = put(store, "pending", ("pending", "pending", "pending"), 2)
    env = saga_env(database_url=db_url, services_url=downstream.url)
    with Saga([ORDER_SAGA, "worker", "--interval", "0.1", "--older-than", "0"], env) as worker:
        wait_until(
            lambda: all(store.get(i).status == "completed" for i in fine),
            what="the drivable orders completed",
            alive=worker.running,
        )
        stopped = worker.stop()
    assert stopped.returncode == 0, stopped.explain()
    stderr = stopped.stderr
    skipped = [line for line in stderr.splitlines() if "order_saga.upgrade" in line]
    assert len(skipped) == 1 and "would strand 1 of 3 live orders" in skipped[0], stderr
    assert "corrupt" not in stderr  # not read by the sweep at all, so not even reported
    with store.engine.connect() as conn:
        row = conn.execute(select(orders).where(orders.c.id == lost)).one()
    assert (row.state, row.inventory_state, row.version) == ("steps_running", "lost", 0)


def test_serve_checks_at_start_and_healthz_shows_the_version(
    db_url: str, store: Store, downstream: Downstream, caplog: pytest.LogCaptureFixture
) -> None:
    put(store, "steps_running", ("requested", "lost", "requested"))
    app = create_app(cli_settings(db_url, downstream.url), sweep=False)
    with caplog.at_level(logging.INFO, logger="order_saga.upgrade"), TestClient(app) as client:
        # The first write probe may outlast its 1 s on a loaded machine (degraded until one
        # commits): the stranded order must not keep it degraded.
        wait_until(lambda: client.get("/healthz").json()["status"] == "ok", what="healthz ok")
        health = client.get("/healthz").json()
        assert app.state.store.undrivable == {("steps_running", "requested", "lost", "requested")}
        assert "order_saga_undrivable_orders 1.0" in client.get("/metrics").text
    assert health["machine_version"] == MACHINE_VERSION and health["status"] == "ok"
    assert "would strand 1 of 1 live orders" in caplog.text
