"""Issue 16: `/healthz` says `degraded` and `/readyz` answers 503, with the reason, while
this process cannot take writes (a write lock held elsewhere, a full disk, a database that
refuses connections), and both are back to ok once writes go through again. Readiness
follows within the probe's 1 s timeout plus its 0.5 s cache; the waits below are
condition polls whose deadlines only turn a hang into a failure. /metrics keeps answering
while the database cannot be read, without the counts made in SQL."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import make_url
from sqlmodel import SQLModel

from api.app import create_app
from downstream.seed import ORDINARY_USER_ID, WIDGET_ID
from fsm.store import make_engine
from tests.support.proxy import CuttableProxy
from tests.support.services import HTTP, LiveServer
from tests.support.settings import saga_settings
from tests.support.waiting import wait_until


def until(check: Callable[[], bool], what: str, timeout: float = 15.0) -> float:
    """Poll `check`; the seconds it took."""
    started = time.monotonic()
    wait_until(check, timeout, what=what)
    return time.monotonic() - started


@pytest.fixture
def serve_on() -> Iterator[Callable[..., str]]:
    servers: list[LiveServer] = []

    def start(db_url: str, services_url: str, **overrides: Any) -> str:
        app = create_app(saga_settings(db_url, services_url, **overrides), sweep=False)
        server = LiveServer(app, lifespan="on").__enter__()
        servers.append(server)
        return server.url

    yield start
    for server in servers:
        server.__exit__()


def schema(url: str) -> None:
    engine = make_engine(url)
    SQLModel.metadata.create_all(engine)
    engine.dispose()


def ready(url: str) -> bool:
    return HTTP.get(f"{url}/readyz", timeout=10).status_code == 200


def not_ready(url: str) -> dict[str, Any] | None:
    answer = HTTP.get(f"{url}/readyz", timeout=10)
    return None if answer.status_code == 200 else dict(answer.json())


def place(url: str) -> httpx.Response:
    body = {"user_id": ORDINARY_USER_ID, "product_id": WIDGET_ID, "quantity": 1}
    return HTTP.post(f"{url}/orders", json=body, timeout=30)


def assert_down(url: str, words: str) -> None:
    problem = not_ready(url)
    assert problem is not None and problem["status"] == 503 and problem["code"] == "not_ready"
    assert words in problem["detail"], problem
    health = HTTP.get(f"{url}/healthz", timeout=10).json()
    assert health["status"] == "degraded" and health["writes"]["ok"] is False, health
    assert words in health["writes"]["reason"], health


def assert_back(url: str) -> None:
    until(lambda: ready(url), "ready again")
    health = HTTP.get(f"{url}/healthz", timeout=10).json()
    assert health["status"] == "ok" and health["writes"] == {"ok": True, "reason": None}


def test_a_held_sqlite_write_lock_makes_it_not_ready(
    tmp_path: Path, services_url: str, serve_on: Callable[..., str]
) -> None:
    import sqlite3

    db = tmp_path / "saga.db"
    schema(f"sqlite:///{db}")
    url = serve_on(f"sqlite:///{db}", services_url)
    assert ready(url)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process's writer, stuck
    try:
        took = until(lambda: not_ready(url) is not None, "not ready while the lock is held")
        print(f"not ready {took:.2f}s after the lock was taken")
        assert_down(url, "locked or slow")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert_back(url)
    assert place(url).status_code == 201


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (needs root and mount(2); otherwise the test cannot be run here)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_makes_it_not_ready_until_a_write_goes_through(
    tiny_disk: Path, services_url: str, serve_on: Callable[..., str]
) -> None:
    db_url = f"sqlite:///{tiny_disk}/saga.db"
    schema(db_url)
    url = serve_on(db_url, services_url)
    assert place(url).status_code == 201
    filler = tiny_disk / "filler"
    with filler.open("wb", buffering=0) as out:  # every free block taken
        try:
            while True:
                out.write(b"\0" * 4096)
        except OSError:
            pass
    try:
        refused = [place(url).status_code for _ in range(30)]
        assert 503 in refused, refused  # the WAL had to grow: the write failed
        assert_down(url, "full")
    finally:
        os.unlink(filler)
    assert not_ready(url) is not None  # nothing has written since: still not proven
    assert place(url).status_code == 201
    assert_back(url)


# db_url's PostgreSQL: emptied first. Earlier tests' dead letters left in pg_url would keep
# /healthz degraded (`events_dead`) after the connection is back.
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_refused_postgresql_connection_makes_it_not_ready(
    db_url: str, services_url: str, serve_on: Callable[..., str]
) -> None:
    direct = make_url(db_url)
    with CuttableProxy(direct.port or 5432) as proxy:
        through = direct.set(port=proxy.port).render_as_string(hide_password=False)
        url = serve_on(through, services_url, db_lock_timeout=2)
        assert place(url).status_code == 201
        assert ready(url)
        proxy.cut()
        took = until(lambda: not_ready(url) is not None, "not ready while refused")
        print(f"not ready {took:.2f}s after the connection was cut")
        problem = not_ready(url)
        assert problem is not None and problem["code"] == "not_ready", problem
        assert "database unavailable" in problem["detail"], problem  # the driver's words follow
        # The reads cannot reach it either: /healthz names the dependency (its own 503).
        health = HTTP.get(f"{url}/healthz", timeout=10)
        assert health.status_code == 503 and health.json()["dependency"] == "database"
        proxy.restore()
        assert_back(url)
        assert place(url).status_code == 201


def samples(url: str) -> dict[str, float]:
    """/metrics (which must answer 200) as `name{labels}` -> value."""
    answer = HTTP.get(f"{url}/metrics", timeout=30)
    assert answer.status_code == 200, answer.text
    found = {}
    for line in answer.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            found[name] = float(value)
    return found


def test_metrics_answer_while_postgresql_is_unreachable(
    pg_url: str, services_url: str, serve_on: Callable[..., str]
) -> None:
    """A database outage is when the breakers and calls matter most: /metrics still
    answers 200 with them and `order_saga_database_up 0`, and leaves out only what is
    counted in SQL (it failed whole with a 503 before)."""
    schema(pg_url)
    direct = make_url(pg_url)
    with CuttableProxy(direct.port or 5432) as proxy:
        through = direct.set(port=proxy.port).render_as_string(hide_password=False)
        url = serve_on(through, services_url, db_lock_timeout=2)
        assert place(url).status_code == 201
        up = samples(url)
        assert up["order_saga_database_up"] == 1
        completed = up['order_saga_orders{status="completed"}']
        assert completed >= 1  # this one (pg_url may hold earlier tests' too)
        proxy.cut()
        down = samples(url)
        assert down["order_saga_database_up"] == 0
        assert not [name for name in down if name.startswith("order_saga_orders")]
        assert "order_saga_parked_orders" not in down
        calls = (
            'order_saga_downstream_calls_total{action="deduct",outcome="success",service="user"}'
        )
        assert down[calls] == up[calls] >= 1  # the process's own counters, as they were
        assert [name for name in down if name.startswith("order_saga_breaker_state")]
        proxy.restore()
        until(lambda: samples(url)["order_saga_database_up"] == 1, "counted again")
        assert samples(url)['order_saga_orders{status="completed"}'] == completed


def test_metrics_of_a_sqlite_database_that_cannot_be_opened_answer_without_the_counts(
    tmp_path: Path,
) -> None:
    """The same on SQLite: the reads cannot open the file (its directory is gone)."""
    from fsm import metrics
    from fsm.queries import Reads

    reads = Reads(make_engine(f"sqlite:///{tmp_path}/gone/saga.db"))
    try:
        text = metrics.exposition(reads.count_by_status, None, reads.oldest_unmoved_by_state)
    finally:
        reads.engine.dispose()
    lines = text.decode().splitlines()
    assert "order_saga_database_up 0.0" in lines
    assert not [
        line for line in lines if line.startswith(("order_saga_orders", "order_saga_parked"))
    ]
    assert [line for line in lines if line.startswith("# TYPE order_saga_run_seconds")]
