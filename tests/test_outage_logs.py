"""A database outage as the processes report it (review of a PostgreSQL deployment): each
retry of the sweep, and each run it stops, is one WARNING line, its traceback only at DEBUG
(a 120-line traceback every 5 s per process buried the log before); any other error keeps
its traceback. HTTP callers, authenticated or not, are told the database is unavailable,
never the driver's text (it names the server's host and port); the log has it. PostgreSQL
behind a proxy that is cut (tests.support.proxy)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

from api.app import create_app
from api.runner import Runner
from downstream.seed import ORDINARY_USER_ID, WIDGET_ID
from fsm import partitions
from fsm.engine import make_engine
from fsm.errors import StoreUnavailable
from fsm.executor import Executor
from fsm.recovery import sweep_forever
from fsm.retention import prune_forever
from fsm.store import Store
from fsm.wiring import open_saga
from tests.support.proxy import CuttableProxy
from tests.support.settings import cli_settings, saga_settings
from tests.support.waiting import wait_until, wait_until_async

DRIVER_TEXT = 'connection failed: connection to server at "127.0.0.1", port 5 failed: refused'


@contextmanager
def through_proxy(db_url: str) -> Iterator[tuple[CuttableProxy, str]]:
    direct = make_url(db_url)
    with CuttableProxy(direct.port or 5432) as proxy:
        yield proxy, direct.set(port=proxy.port).render_as_string(hide_password=False)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)  # a server to cut
async def test_each_sweep_retry_while_postgresql_is_down_is_one_warning_line(
    db_url: str, services_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="order_saga.recovery")

    def retries() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.getMessage().startswith("sweep failed")]

    with through_proxy(db_url) as (proxy, through):
        settings = saga_settings(through, services_url, sweep_interval=0.1, db_lock_timeout=1)
        async with open_saga(settings) as saga:
            proxy.cut()
            sweep = asyncio.create_task(
                sweep_forever(store=saga.store, executor=saga.executor, settings=settings)
            )
            try:
                await wait_until_async(lambda: len(retries()) >= 3, what="three sweep retries")
            finally:
                sweep.cancel()
                await asyncio.gather(sweep, return_exceptions=True)
                proxy.restore()
    for record in retries():
        assert record.levelno == logging.WARNING, record
        assert record.exc_info is None, record.getMessage()
        assert "\n" not in record.getMessage(), record.getMessage()
        assert "database unavailable" in record.getMessage()  # what, in the one line


async def test_a_run_stopped_by_the_database_is_one_warning_other_errors_a_traceback(
    db_url: str, store: Store, executor: Executor, caplog: pytest.LogCaptureFixture
) -> None:
    """The runner's end of a run (api.runner): the executor's concurrent steps both lost
    the database end in an ExceptionGroup of StoreUnavailable, a warning in one line."""
    caplog.set_level(logging.INFO, logger="order_saga.runner")
    order, _ = await store.create_order(
        user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1, owner=executor.owner
    )
    runner = Runner(store=store, executor=executor, settings=saga_settings(db_url))

    async def ends_with(error: BaseException) -> None:
        task = runner.adopt(order, _raise(error))
        await asyncio.gather(task, return_exceptions=True)
        await wait_until_async(lambda: task not in runner.tasks, what="the run's end")

    lost = StoreUnavailable(f"database unavailable: {DRIVER_TEXT}")
    await ends_with(ExceptionGroup("steps", [lost, StoreUnavailable("database busy: x")]))
    await ends_with(lost)
    await ends_with(RuntimeError("a bug"))
    stopped = [r for r in caplog.records if "stopped" in r.getMessage()]
    assert [r.levelno for r in stopped] == [logging.WARNING, logging.WARNING, logging.ERROR]
    assert [r.exc_info is None for r in stopped] == [True, True, False]
    assert all("\n" not in r.getMessage() for r in stopped)
    assert "database unavailable" in stopped[0].getMessage()


async def _raise(error: BaseException) -> None:
    raise error


def assert_told_nothing_of_the_driver(body: str, proxy: CuttableProxy) -> None:
    for words in ("127.0.0.1", str(proxy.port), "connection", "refused", "server at"):
        assert words not in body, body


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)  # a server to cut
def test_503s_while_postgresql_is_down_do_not_carry_the_driver_s_text(
    db_url: str, services_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """/readyz (unauthenticated) and POST /orders answer 503 with the generic detail; the
    host and port went to callers before (`cannot write: database unavailable: connection
    failed: connection to server at "127.0.0.1", port 47250 failed`)."""
    caplog.set_level(logging.WARNING)
    with through_proxy(db_url) as (proxy, through):
        settings = cli_settings(through, services_url, db_lock_timeout=1.0)
        with TestClient(create_app(settings, sweep=False), raise_server_exceptions=False) as c:
            body = {"user_id": ORDINARY_USER_ID, "product_id": WIDGET_ID, "quantity": 1}
            assert c.post("/orders", json=body).status_code == 201
            proxy.cut()
            ready = wait_until(
                lambda: (r := c.get("/readyz")).status_code == 503 and r,
                what="/readyz to say not ready",
            )
            assert ready.json()["detail"].startswith("cannot write: database unavailable")
            assert_told_nothing_of_the_driver(ready.text, proxy)
            health = c.get("/healthz")
            assert health.status_code in (200, 503), health.text
            assert_told_nothing_of_the_driver(health.text, proxy)
            refused = c.post("/orders", json=body)
            assert refused.status_code == 503, refused.text
            assert refused.json()["detail"].startswith("database unavailable")
            assert_told_nothing_of_the_driver(refused.text, proxy)
            proxy.restore()
    assert f"port {proxy.port}" in caplog.text  # the driver's words: in the log


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)  # a server to cut
async def test_each_retry_of_the_background_passes_while_postgresql_is_down_is_one_line(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Retention and partition maintenance run on an engine of their own (SQLAlchemy's
    errors, not StoreUnavailable): an outage is one WARNING line per retry there too."""
    caplog.set_level(logging.INFO, logger="order_saga")

    def failed(what: str) -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.getMessage().startswith(f"{what} failed")]

    with through_proxy(db_url) as (proxy, through):
        settings = saga_settings(
            through, retention_seconds=3600, retention_interval=0.1, db_lock_timeout=1
        )
        engine = make_engine(through, lock_timeout=1, statement_timeout=2)
        proxy.cut()
        passes = [
            asyncio.create_task(prune_forever(engine=engine, settings=settings)),
            asyncio.create_task(partitions.maintain_forever(engine, every=0.1)),
        ]
        try:
            await wait_until_async(
                lambda: (
                    len(failed("retention pass")) >= 2 and len(failed("partition maintenance")) >= 2
                ),
                what="two retries of each pass",
            )
        finally:
            for task in passes:
                task.cancel()
            await asyncio.gather(*passes, return_exceptions=True)
            proxy.restore()
            engine.dispose()
    for record in failed("retention pass") + failed("partition maintenance"):
        assert record.levelno == logging.WARNING, record
        assert record.exc_info is None, record.getMessage()
        assert "\n" not in record.getMessage(), record.getMessage()
        assert "database unavailable" in record.getMessage()
