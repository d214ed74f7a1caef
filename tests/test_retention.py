"""Retention (issue 22) on SQLite and PostgreSQL: a prune deletes exactly the eligible
orders (terminal, unleased, old enough or beyond the newest N) with their transitions and
never a running, parked or leased one, nor one whose Idempotency-Key a retry may still
use; the archive round-trips to what `orders show` printed; the background pass prunes on
its own, in `serve --no-sweep` too; one pruner at a time on PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from downstream.seed import ORDINARY_USER_ID, WIDGET_ID
from fsm import archive
from fsm.errors import OrderNotFound
from fsm.executor import Executor
from fsm.retention import IDEMPOTENCY_WINDOW, Pruner, prune_forever
from fsm.store import Store, make_engine, utcnow
from order_saga.cli import app
from tests.support.api import api, order_effects, place
from tests.support.retention import (
    Population,
    created_earlier,
    orphan_transitions,
    populate,
    transition_count,
)
from tests.support.services import HTTP, Downstream
from tests.support.serving import Served, fresh_database
from tests.support.settings import saga_env, saga_settings
from tests.support.waiting import wait_until, wait_until_async


def assert_pruned(store: Store, population: Population, gone: list[uuid.UUID]) -> None:
    for order_id in gone:
        with pytest.raises(OrderNotFound):
            store.get(order_id)
        assert store.history(order_id) == []
    assert orphan_transitions(store) == 0


async def test_prune_deletes_exactly_the_eligible_orders_with_their_transitions(
    store: Store, executor: Executor, downstream: Downstream
) -> None:
    population = await populate(store, executor, downstream)
    kept_before = {why: (store.get(i), store.history(i)) for why, i in population.kept.items()}
    lines = sum(transition_count(store, i) for i in population.eligible)

    summary = Pruner(store.engine, older_than=0, batch=2).run()

    assert summary.deleted == len(population.eligible)
    assert summary.batches == 3  # 5 eligible orders, 2 a batch
    assert summary.transitions == lines
    assert_pruned(store, population, population.eligible)
    for why, (order, history) in kept_before.items():  # untouched, log and all
        assert store.get(order.id).version == order.version, why
        assert store.history(order.id) == history, why
    assert Pruner(store.engine, older_than=0).run().deleted == 0  # nothing left to do


async def test_only_orders_older_than_the_cutoff_go(
    store: Store, executor: Executor, downstream: Downstream
) -> None:
    population = await populate(store, executor, downstream, completed=2)
    old, new = population.eligible[0], population.eligible[-1]
    a, b = store.get(old).updated_at, store.get(new).updated_at
    assert a < b
    now = utcnow()
    older_than = (now - (a + (b - a) / 2)).total_seconds()

    summary = Pruner(store.engine, older_than=older_than, clock=lambda: now).run()

    assert summary.deleted >= 1
    assert_pruned(store, population, [old])
    assert store.get(new).status == "failed"
    assert transition_count(store, new) == len(store.history(new)) > 0


async def test_keep_rows_keeps_the_newest_terminal_orders(
    store: Store, executor: Executor, downstream: Downstream
) -> None:
    population = await populate(store, executor, downstream, completed=3)
    newest_two = sorted(population.eligible, key=lambda i: store.get(i).updated_at)[-2:]
    # The leased completed order is terminal too: it counts among the newest, and stays.
    summary = Pruner(store.engine, older_than=None, keep_rows=3).run()
    assert summary.deleted == len(population.eligible) - 2
    for order_id in newest_two:
        assert store.get(order_id)
    assert_pruned(store, population, [i for i in population.eligible if i not in newest_two])


async def test_dry_run_counts_and_deletes_nothing(
    store: Store, executor: Executor, downstream: Downstream
) -> None:
    population = await populate(store, executor, downstream, completed=1)
    summary = Pruner(store.engine, older_than=0).count()
    assert summary.eligible == len(population.eligible)
    assert set(summary.ids) == {str(i) for i in population.eligible}
    assert all(store.get(i) for i in population.eligible)


async def test_the_archive_round_trips_to_what_orders_show_printed(
    db_url: str, store: Store, executor: Executor, downstream: Downstream, tmp_path: Path
) -> None:
    population = await populate(store, executor, downstream, completed=1)
    env = saga_env(database_url=db_url, services_url=downstream.url)
    cli = CliRunner()
    shown = {
        (i, flag): cli.invoke(app, ["orders", "show", str(i), *flag], env=env)
        for i in population.eligible
        for flag in ((), ("--json",))
    }
    assert all(r.exit_code == 0 for r in shown.values()), shown
    file = tmp_path / "pruned.jsonl.gz"

    pruned = cli.invoke(app, ["prune", "--older-than", "0", "--archive", str(file)], env=env)

    assert pruned.exit_code == 0, pruned.output
    assert f"deleted {len(population.eligible)} orders" in pruned.output
    assert_pruned(store, population, population.eligible)
    for (order_id, flag), before in shown.items():
        after = cli.invoke(app, ["archive", "show", str(file), str(order_id), *flag], env=env)
        assert after.exit_code == 0, after.output
        assert after.output == before.output
    lines = list(archive.read(file))
    assert [line["format_version"] for line in lines] == [1] * len(population.eligible)
    missing = cli.invoke(app, ["archive", "show", str(file), str(population.kept["live"])])
    assert missing.exit_code == 1 and "is not in" in missing.output


async def test_the_background_pass_prunes_with_the_settings(
    db_url: str, store: Store, executor: Executor, downstream: Downstream, tmp_path: Path
) -> None:
    population = await populate(store, executor, downstream, completed=1)
    settings = saga_settings(
        db_url, retention_seconds=0.001, retention_interval=0.05, archive_dir=str(tmp_path)
    )
    task = asyncio.create_task(prune_forever(engine=store.engine, settings=settings))
    try:
        await wait_until_async(
            lambda: (
                orphan_transitions(store) == 0
                and all(transition_count(store, i) == 0 for i in population.eligible)
            ),
            what="every eligible order pruned",
            interval=0.025,
        )
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert_pruned(store, population, population.eligible)
    files = list(tmp_path.glob("orders-*.jsonl.gz"))  # (the SQLite database is here too)
    archived = {line["order"]["id"] for f in files for line in archive.read(f)}
    assert archived == {str(i) for i in population.eligible}
    assert all(store.get(i) for i in population.kept.values())


def test_one_pruner_at_a_time_on_postgresql(pg_url: str) -> None:
    engine = make_engine(pg_url)  # (SQLite's single writer needs no such lock)
    first, second = Pruner(engine, older_than=0), Pruner(engine, older_than=0)
    with first.session() as held:
        assert held is not None
        with second.session() as refused:
            assert refused is None
    with second.session() as free:  # released with the first one's session
        assert free is not None
    engine.dispose()


async def test_an_event_a_destination_s_cursor_has_not_passed_keeps_its_order(
    store: Store, executor: Executor, downstream: Downstream
) -> None:
    """A destination subscribed before the orders: its cursor not past an order's last
    event keeps the order (and its events); once past, it goes."""
    from sqlalchemy import text

    from fsm import outbox, subscriptions

    subscriptions.add_webhook(store, "http://127.0.0.1:9/r", outbox.ALL_TYPES)
    population = await populate(store, executor, downstream, completed=2)
    with store.engine.connect() as conn:
        stream = conn.execute(
            text("SELECT order_id, txid, position FROM outbox_events ORDER BY txid, position")
        ).all()
    last_of = {str(order).replace("-", ""): (txid, pos) for order, txid, pos in stream}
    # The eligible order whose last event comes last: the others' events all come before.
    kept = max(population.eligible, key=lambda i: last_of[i.hex])
    last = last_of[kept.hex]
    assert Pruner(store.engine, older_than=0).run().deleted == 0  # nothing passed yet

    def cursor_at(txid: int, position: int) -> None:
        with store.engine.begin() as conn:
            conn.execute(
                text("UPDATE outbox_cursors SET txid = :t, position = :p"),
                {"t": txid, "p": position},
            )

    cursor_at(last[0], last[1] - 1)  # every event passed but the kept order's last one
    Pruner(store.engine, older_than=0).run()
    assert store.get(kept).id == kept  # its last event not passed: kept
    assert_pruned(store, population, [i for i in population.eligible if i != kept])
    cursor_at(last[0], last[1])
    Pruner(store.engine, older_than=0).run()
    assert_pruned(store, population, population.eligible)


async def test_an_order_with_an_undelivered_event_is_kept_a_delivered_one_goes(
    store: Store, executor: Executor, downstream: Downstream
) -> None:
    from sqlalchemy import text

    from fsm import outbox, subscriptions
    from fsm.models import OutboxDeliveryTable, OutboxEventTable

    population = await populate(store, executor, downstream, completed=3)
    waiting, delivered, orphaned = population.eligible[:3]
    deliveries = OutboxDeliveryTable.__table__  # type: ignore[attr-defined]
    events = OutboxEventTable.__table__  # type: ignore[attr-defined]
    now = utcnow()
    with store.engine.begin() as conn:
        for order_id in (waiting, delivered, orphaned):
            conn.execute(
                events.insert(),
                {"id": f"{order_id}:99", "order_id": order_id, "seq": 99,
                 "type": "order.completed", "created_at": now, "body": "{}"},
            )  # fmt: skip
    # Subscribed after those events, its cursor put past every one of them: their exception
    # rows alone say what is owed. (Not left where `add_webhook` starts it: on PostgreSQL that
    # is the cluster's horizon, held back by any transaction running in any database, so a
    # busy cluster left these events "not passed" and their orders kept.)
    webhook = subscriptions.add_webhook(store, "http://127.0.0.1:9/hook", outbox.DEFAULT_TYPES)
    there, removed = webhook.destination.id, webhook.destination.id + 1000
    with store.engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE outbox_cursors SET txid = (SELECT MAX(txid) FROM outbox_events), "
                "position = (SELECT MAX(position) FROM outbox_events)"
            )
        )
        for order_id, state, destination in (
            (waiting, "pending", there),
            (delivered, "delivered", there),
            (orphaned, "pending", removed),  # owed to a destination no longer there
        ):
            conn.execute(
                deliveries.insert(),
                {"destination_id": destination, "event_id": f"{order_id}:99",
                 "order_id": order_id, "seq": 99, "state": state, "next_attempt_at": now,
                 "created_at": now, "retry_from": now},
            )  # fmt: skip

    Pruner(store.engine, older_than=0).run()

    assert store.get(waiting).status == "completed"  # its event still owed: kept
    assert_pruned(store, population, [i for i in population.eligible if i != waiting])
    with store.engine.connect() as conn:
        left = {r.order_id for r in conn.execute(deliveries.select())}
        left_events = {r.order_id for r in conn.execute(events.select())}
    assert left == {waiting}
    assert waiting in left_events
    gone = set(population.eligible) - {waiting}
    assert not gone & left_events  # the outbox rows of the deleted ones went with them


def test_a_retry_after_a_prune_finds_its_order_while_its_key_s_window_lasts(
    db_url: str, store: Store, downstream: Downstream
) -> None:
    """SPEC §4: a retried POST with the same Idempotency-Key returns the same order, never a
    second one. The key lives in its order's row: `prune --older-than 0` keeps an order
    placed with one for IDEMPOTENCY_WINDOW after its creation (and says so), and takes it
    once that has passed."""
    env = saga_env(database_url=db_url, services_url=downstream.url)
    cli = CliRunner()
    key = {"Idempotency-Key": f"checkout-{uuid.uuid4()}"}
    with api(db_url, downstream.url) as client:
        keyed, plain = place(client, headers=key), place(client)
        assert keyed.status_code == plain.status_code == 201, (keyed.text, plain.text)
        keyed_id, plain_id = keyed.json()["id"], plain.json()["id"]
        balance = downstream.balance(ORDINARY_USER_ID)

        dry = cli.invoke(app, ["prune", "--older-than", "0", "--dry-run"], env=env)
        as_json = cli.invoke(app, ["prune", "--older-than", "0", "--dry-run", "--json"], env=env)
        pruned = cli.invoke(app, ["prune", "--older-than", "0"], env=env)

        held = "1 kept: placed with an Idempotency-Key less than 24h ago"
        assert dry.exit_code == 0, dry.output
        assert dry.stdout.startswith("would delete 1 orders\n") and held in dry.stdout
        assert as_json.exit_code == 0, as_json.output
        counted = json.loads(as_json.stdout)
        assert (counted["eligible"], counted["key_held"], counted["ids"]) == (1, 1, [plain_id])
        assert pruned.exit_code == 0, pruned.output
        assert pruned.stdout.startswith("deleted 1 orders") and held in pruned.stdout
        assert client.get(f"/orders/{plain_id}").status_code == 404  # no key: gone
        assert client.get(f"/orders/{keyed_id}").json()["status"] == "completed"

        again = place(client, headers=key)

        assert again.status_code == 201, again.text
        assert again.json()["id"] == keyed_id  # the same order, not a second one
        assert downstream.balance(ORDINARY_USER_ID) == balance  # charged once
        assert order_effects(downstream, keyed_id)[f"{keyed_id}:payment:deduct"] == 1
        assert [o["id"] for o in client.get("/orders").json()["orders"]] == [keyed_id]

        # Placed a window (and a minute) ago: the key may no longer be retried; it goes.
        created_earlier(store, [uuid.UUID(keyed_id)], IDEMPOTENCY_WINDOW + timedelta(minutes=1))
        later = cli.invoke(app, ["prune", "--older-than", "0"], env=env)

        assert later.exit_code == 0, later.output
        assert later.stdout.startswith("deleted 1 orders") and "kept" not in later.stdout
        assert client.get(f"/orders/{keyed_id}").status_code == 404
    assert orphan_transitions(store) == 0


async def test_the_background_pass_and_keep_leave_an_order_whose_key_is_in_its_window(
    db_url: str, store: Store, executor: Executor, downstream: Downstream
) -> None:
    async def placed(key: str | None) -> uuid.UUID:
        order, _ = await store.create_order(
            user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1,
            idempotency_key=key, owner=executor.owner,
        )  # fmt: skip
        await executor.drive(order)
        return order.id

    keyed, plain = await placed(f"k-{uuid.uuid4()}"), await placed(None)
    settings = saga_settings(db_url, retention_seconds=0.001, retention_interval=0.05)
    task = asyncio.create_task(prune_forever(engine=store.engine, settings=settings))
    try:
        await wait_until_async(
            lambda: transition_count(store, plain) == 0,
            what="the order without a key pruned",
            interval=0.025,
        )
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert_pruned(store, Population(), [plain])
    assert store.get(keyed).status == "completed"
    kept = Pruner(store.engine, older_than=None, keep_rows=0).run()
    assert (kept.deleted, kept.key_held) == (0, 1)
    assert store.get(keyed).status == "completed"

    created_earlier(store, [keyed], IDEMPOTENCY_WINDOW + timedelta(seconds=1))
    gone = Pruner(store.engine, older_than=None, keep_rows=0).run()

    assert (gone.deleted, gone.key_held) == (1, 0)
    assert_pruned(store, Population(), [keyed])


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("broken", ["attempts", "transition"])
async def test_a_broken_value_keeps_its_order_and_the_prune_goes_on(
    db_url: str,
    store: Store,
    executor: Executor,
    downstream: Downstream,
    tmp_path: Path,
    broken: str,
) -> None:
    """An eligible order with a value no reader can parse (a hand edit, a botched
    migration) is skipped, kept whole, and the others are pruned and archived; before, the
    batch's read raised and every prune from then on failed. SQLite only: PostgreSQL's
    typed columns refuse such values."""
    population = await populate(store, executor, downstream, completed=2)
    bad, *rest = population.eligible
    lines = transition_count(store, bad)
    with store.engine.begin() as conn:
        if broken == "attempts":
            sql = "UPDATE orders SET attempts = '{bad' WHERE id = :id"
        else:
            sql = "UPDATE transitions SET created_at = 'garbage' WHERE order_id = :id AND seq = 1"
        conn.exec_driver_sql(sql.replace(":id", "?"), (bad.hex,))

    summary = Pruner(
        store.engine, older_than=0, appender=lambda: archive.Appender(tmp_path / "a.jsonl.gz")
    ).run()

    assert summary.deleted == len(rest) and summary.archived == len(rest)
    assert_pruned(store, population, rest)
    assert transition_count(store, bad) == lines > 0  # kept whole
    archived = {line["order"]["id"] for line in archive.read(tmp_path / "a.jsonl.gz")}
    assert archived == {str(i) for i in rest}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_serve_no_sweep_still_prunes(kind: str, tmp_path: Path, downstream: Downstream) -> None:
    """`--no-sweep` turns off the recovery sweep only: retention (and the roll-up, the day
    partitions) is every process's upkeep. Before, it went off too and nothing was pruned."""
    with fresh_database(kind, str(tmp_path)) as url:
        env = saga_env(
            database_url=url,
            services_url=downstream.url,
            retention_seconds=0.001,
            retention_interval=0.05,
        )
        served = Served(env).wait_ready()  # `serve --no-sweep`
        try:
            body = {"user_id": ORDINARY_USER_ID, "product_id": WIDGET_ID, "quantity": 1}
            placed = [HTTP.post(f"{served.url}/orders", json=body) for _ in range(3)]
            assert all(r.status_code in (201, 202) for r in placed), [r.text for r in placed]
            ids = [r.json()["id"] for r in placed]
            wait_until(
                lambda: all(HTTP.get(f"{served.url}/orders/{i}").status_code == 404 for i in ids),
                30,
                what="every completed order pruned",
                alive=served.saga.running,
            )
        finally:
            output = served.stop()
    assert "Traceback" not in output, output
