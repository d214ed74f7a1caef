"""The relay's store (`fsm.wiring.relay_store`): on PostgreSQL its commits (deliveries
recorded) do not wait for the disk, while the orders' commits still do."""

from __future__ import annotations

from typing import Any

from fsm.engine import backend, make_engine
from fsm.wiring import build_store, relay_store
from tests.support.settings import saga_settings


def show(cursor: Any) -> str:
    row = cursor.execute("SHOW synchronous_commit").fetchone()
    return str(row[0])


async def test_the_relays_commits_do_not_wait_for_the_disk_the_orders_do(pg_url: str) -> None:
    settings = saga_settings(pg_url)
    relays, orders = relay_store(settings), build_store(settings)
    try:
        assert await relays.committer.submit(show) == "off"
        assert await orders.committer.submit(show) == "on"
    finally:
        for store in (relays, orders):
            store.close()
            store.engine.dispose()


def test_both_writer_lanes_of_a_relay_store_commit_asynchronously(pg_url: str) -> None:
    engine = make_engine(pg_url)
    try:
        for synchronous, expected in ((False, "off"), (True, "on")):
            lanes = backend(
                engine, lock_timeout=5, statement_timeout=30, synchronous_commit=synchronous
            )
            assert lanes.side is not None
            for lane in (lanes, lanes.side):
                conn = lane.connect()
                try:
                    assert show(conn) == expected
                finally:
                    conn.close()
    finally:
        engine.dispose()
