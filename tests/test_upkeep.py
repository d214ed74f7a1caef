"""`fsm.upkeep`, the background work `serve` and `worker` both run beside their orders: the
passes each process runs (retention when set, the roll-up, the partitions on PostgreSQL),
the relay child, and how they stop: cancelled and awaited before the store is closed (the
worker used to cancel its passes from the sweep's done-callbacks and close the store
without waiting for them), an error one ends with logged when it ends (`serve` used to
gather its passes' errors away at shutdown; a relay that died said nothing until then)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from fsm import upkeep
from fsm.store import Store
from tests.support.settings import saga_settings


async def test_every_pass_and_the_relay_run_for_the_block_and_have_ended_after_it(
    db_url: str, store: Store
) -> None:
    settings = saga_settings(db_url, retention_seconds=3600, heat_roll_interval=60, relay=True)
    async with upkeep.running(store=store, settings=settings) as tasks:
        names = sorted(task.get_name() for task in tasks)
        assert not any(task.done() for task in tasks)
    expected = ["relay", "retention", "roll-up"]
    assert names == sorted([*expected, "partitions"] if store.is_postgres else expected)
    assert all(task.done() for task in tasks)  # awaited, not only asked to stop


async def test_no_pass_but_those_settings_and_database_call_for(db_url: str, store: Store) -> None:
    settings = saga_settings(db_url, heat_roll_interval=0, relay=False)
    async with upkeep.running(store=store, settings=settings) as tasks:
        names = [task.get_name() for task in tasks]
    assert names == (["partitions"] if store.is_postgres else [])


async def test_a_task_that_stops_with_an_error_is_logged_when_it_stops(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken() -> None:
        raise OSError("no child process")

    stopped = upkeep.start(broken(), name="relay")
    await asyncio.wait({stopped})
    await asyncio.sleep(0)  # its done-callbacks run on the loop's next turn
    [record] = [r for r in caplog.records if r.name == "order_saga.upkeep"]
    assert record.levelno == logging.ERROR
    assert record.getMessage() == "background task relay stopped"
    assert record.exc_info is not None and "no child process" in str(record.exc_info[1])
    await upkeep.stop([stopped])  # already logged: stopping raises nothing


async def test_stop_waits_for_what_a_task_does_once_cancelled() -> None:
    cleaned = asyncio.Event()

    async def holds_a_session() -> None:
        try:
            await asyncio.Event().wait()  # forever, until cancelled
        finally:
            await asyncio.sleep(0)  # e.g. a session closed in a worker thread
            cleaned.set()

    task = upkeep.start(holds_a_session(), name="retention")
    await asyncio.sleep(0)  # started
    await upkeep.stop([task])
    assert cleaned.is_set() and task.cancelled()
