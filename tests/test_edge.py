"""The edges of a running process (issue 11, items 5, 9, 10, 12, 14, 15): the database
down is a 503 problem with Retry-After, slow clients are cut off, diagrams render off the
loop, `resume --order --dry-run` reads only, URLs never print their password, SIGTERM
drains within its grace period."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import SQLModel

from api.app import create_app
from api.diagram import Renderer
from downstream.seed import ORDINARY_USER_ID, WIDGET_ID
from fsm.models import Transition
from fsm.store import Store, make_engine
from fsm.wiring import open_store
from order_saga.server import uvicorn_options
from tests.support.database import PG_SERVER
from tests.support.processes import Saga, command, run_cli
from tests.support.services import HTTP, Downstream, LiveServer, answers, free_port
from tests.support.settings import cli_settings, saga_env, saga_settings
from tests.support.waiting import wait_until, wait_until_async

UNREACHABLE = {
    "postgresql, nothing listening": lambda: (
        f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x"
    ),
    "postgresql, no such database": lambda: f"{PG_SERVER}/order_saga_no_such_database",
    "sqlite, unopenable path": lambda: "sqlite:////nonexistent/dir/saga.db",
}


@pytest.mark.parametrize("make_url", UNREACHABLE.values(), ids=UNREACHABLE.keys())
def test_database_down_is_a_503_problem_with_retry_after(make_url: Any, tmp_path: Path) -> None:
    settings = cli_settings(make_url(), services_db=str(tmp_path / "s.db"))
    with TestClient(create_app(settings, sweep=False)) as client:
        health = client.get("/healthz")
        answers = [
            client.get("/orders"),
            client.get(f"/orders/{uuid.uuid4()}"),
            client.post(
                "/orders",
                json={"user_id": ORDINARY_USER_ID, "product_id": WIDGET_ID, "quantity": 1},
            ),
            client.post(f"/orders/{uuid.uuid4()}/resume"),
        ]
        metrics = client.get("/metrics")  # answers: what it can count without the database
        # The embedded services too: the gate cannot read its keys, so it fails closed.
        answers.append(client.get(f"/services/users/{ORDINARY_USER_ID}"))
    for response in [health, *answers]:
        assert response.status_code == 503, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert int(response.headers["Retry-After"]) > 0
        body = response.json()
        assert body["dependency"] == "database" and body["code"] == "store_unavailable"
        assert "password" not in response.text
    assert metrics.status_code == 200, metrics.text
    assert "order_saga_database_up 0.0" in metrics.text.splitlines()


def test_healthz_names_the_database_when_up(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/up.db"
    settings = cli_settings(url, services_db=str(tmp_path / "s.db"))
    with TestClient(create_app(settings, sweep=False)) as client:
        health = client.get("/healthz").json()  # also machine_version and breakers (issue 10)
        assert (health["status"], health["database"]) == ("ok", "sqlite")


# -- diagrams: off the loop, capped, cached ----------------------------------------------------


async def test_diagrams_render_off_the_loop_capped_and_cached() -> None:
    entered: list[str] = []
    release = threading.Event()

    def slow_draw(fmt: str, history: Sequence[Transition] | None) -> bytes:
        entered.append(fmt)
        assert release.wait(10), "never released"
        return f"picture {fmt} {len(history or ())}".encode()

    renderer = Renderer(concurrency=1, draw=slow_draw)
    order = uuid.uuid4()
    jobs = [
        asyncio.create_task(renderer.render((order, seq, "png"), "png", None)) for seq in (1, 2, 3)
    ]
    # The loop runs this while a drawing blocks a thread.
    await wait_until_async(lambda: entered, what="the first drawing to start")
    assert len(entered) == 1  # capped: the two others wait for the one token
    release.set()
    assert await asyncio.gather(*jobs) == [b"picture png 0"] * 3
    assert len(entered) == 3
    again = await renderer.render((order, 2, "png"), "png", None)  # same order, same seq
    assert again == b"picture png 0" and len(entered) == 3  # served from the cache


# -- resume --order --dry-run ------------------------------------------------------------------


async def test_resume_one_order_dry_run_changes_nothing(
    db_url: str, store: Store, downstream: Downstream
) -> None:
    env = saga_env(database_url=db_url, services_url=downstream.url)
    stuck, _ = await store.create_order(user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1)
    before = store.get(stuck.id)

    dry = run_cli("resume", "--order", str(stuck.id), "--dry-run", **env)

    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.strip() == f"{stuck.id} pending (pending): would resume"
    after = store.get(stuck.id)
    assert (after.state, after.version, after.lease_owner) == ("pending", before.version, None)
    assert store.history(stuck.id) == [] and downstream.effects() == {}
    assert run_cli("resume", "--order", str(stuck.id), **env).returncode == 0  # for real
    assert store.get(stuck.id).status == "completed"


async def test_resume_one_order_dry_run_names_a_finished_or_leased_order(
    db_url: str, store: Store, downstream: Downstream
) -> None:
    env = saga_env(database_url=db_url, services_url=downstream.url)
    done, _ = await store.create_order(user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1)
    assert run_cli("resume", "--order", str(done.id), **env).returncode == 0
    held, _ = await store.create_order(
        user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1, owner="worker-7"
    )
    expires = store.get(held.id).lease_expires_at
    assert expires is not None

    finished = run_cli("resume", "--order", str(done.id), "--dry-run", **env)
    finished_json = run_cli("resume", "--order", str(done.id), "--dry-run", "--json", **env)
    leased = run_cli("resume", "--order", str(held.id), "--dry-run", **env)
    leased_json = run_cli("resume", "--order", str(held.id), "--dry-run", "--json", **env)

    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.strip() == f"{done.id} completed (completed): terminal: nothing to do"
    assert json.loads(finished_json.stdout)["found"] == 0
    assert leased.returncode == 0, leased.stderr
    assert leased.stdout.strip() == (
        f"{held.id} pending (pending): leased by worker-7 until "
        f"{expires:%Y-%m-%d %H:%M:%S} UTC"  # as every other surface prints a time
    )
    report = json.loads(leased_json.stdout)
    assert (report["found"], report["skipped_leased"]) == (0, 1)
    assert store.get(held.id).version == held.version  # read only


# -- passwords never printed ---------------------------------------------------------------------


def test_db_upgrade_masks_the_password_on_success_and_failure(tmp_path: Path) -> None:
    from tests.support.database import create_pg_database, drop_pg_database

    name = f"order_saga_mask_{uuid.uuid4().hex[:8]}"
    create_pg_database(name)
    try:
        server = PG_SERVER.replace("postgres@", "postgres:hunter2@")  # trust auth ignores it
        ok = run_cli("db", "upgrade", ORDER_SAGA_DATABASE_URL=f"{server}/{name}")
        assert ok.returncode == 0, ok.stderr
        assert (
            ok.stdout.strip()
            == f"database at head: {server.replace('postgres:hunter2@', '***@')}/{name}"
        )
    finally:
        drop_pg_database(name)
    refused = run_cli(
        "db",
        "upgrade",
        ORDER_SAGA_DATABASE_URL=f"postgresql+psycopg://postgres:hunter2@127.0.0.1:{free_port()}/x",
    )
    assert refused.returncode == 1
    assert "hunter2" not in refused.stdout + refused.stderr
    assert "cannot migrate postgresql+psycopg://***@127.0.0.1:" in refused.stderr
    unparsable = run_cli(
        "db", "upgrade", ORDER_SAGA_DATABASE_URL="postgresql+psycopg://u:hunter2@host:port/x"
    )
    assert unparsable.returncode == 2
    assert unparsable.stderr == (
        "order-saga: invalid ORDER_SAGA_DATABASE_URL: Value error, is not a valid database URL\n"
    )


# -- slow clients ----------------------------------------------------------------------------------


@pytest.fixture
def edge_server(tmp_path: Path) -> Iterator[int]:
    """`serve`'s uvicorn options (header deadline 0.5 s, body deadline 0.5 s) on a port."""
    url = f"sqlite:///{tmp_path}/edge.db"
    engine = make_engine(url)
    SQLModel.metadata.create_all(engine)
    engine.dispose()
    settings = cli_settings(
        url, services_db=str(tmp_path / "s.db"), header_timeout=0.5, body_timeout=0.5
    )
    app = create_app(settings, sweep=False)
    with LiveServer(app, lifespan="auto", **uvicorn_options(settings)) as server:
        yield server.port


def test_trickled_headers_are_cut_off(edge_server: int) -> None:
    with socket.create_connection(("127.0.0.1", edge_server), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        deadline = time.monotonic() + 10
        closed = False
        while not closed and time.monotonic() < deadline:  # one header byte per 50 ms
            try:
                sock.sendall(b"X")
                sock.settimeout(0.05)
                closed = sock.recv(1024) == b""
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = True
        assert closed, "a client trickling headers kept its connection for 10 s"


def test_a_slow_body_is_a_408(edge_server: int) -> None:
    with socket.create_connection(("127.0.0.1", edge_server), timeout=10) as sock:
        sock.sendall(
            b"POST /orders HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{"
        )
        answer = sock.recv(4096)  # the server gives up waiting for the other 99 bytes
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]


def test_a_whole_request_is_still_served(edge_server: int) -> None:
    response = HTTP.get(f"http://127.0.0.1:{edge_server}/healthz")
    assert response.status_code == 200


# -- SIGTERM in embedded mode ---------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_drains_within_the_grace_period_and_releases_leases(tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    url = f"sqlite:///{tmp_path}/saga.db"
    env = saga_env(database_url=url)
    env |= {
        "ORDER_SAGA_SERVICES_DB": str(tmp_path / "services.db"),
        "ORDER_SAGA_SHUTDOWN_GRACE": "1",
        "ORDER_SAGA_HTTP_TIMEOUT": "120",
        "ORDER_SAGA_LEASE_SECONDS": "300",
    }
    with Saga(command("serve", "--port", str(port), "--no-sweep"), env) as serve:
        wait_until(lambda: answers(f"{base}/healthz"), what="serve", alive=serve.running)
        fault = {"operation": "user.deduct", "mode": "delay", "count": 1, "seconds": 600}
        HTTP.post(f"{base}/services/_faults", json=fault).raise_for_status()
        body = {"user_id": ORDINARY_USER_ID, "product_id": WIDGET_ID, "quantity": 1}
        placed = HTTP.post(f"{base}/orders", json=body, headers={"Prefer": "respond-async"})
        order_id = placed.json()["id"]
        wait_until(
            lambda: HTTP.get(f"{base}/orders/{order_id}").json()["steps"]["payment"] == "requested",
            what="the payment call to start",
            alive=serve.running,
        )
        stopped = serve.stop(timeout=60)  # SIGTERM with a 600 s call in flight
    # uvicorn re-raises the signal it handled once it has shut down cleanly.
    assert stopped.returncode in (0, -signal.SIGTERM), stopped.explain()
    assert "Application shutdown complete" in stopped.stderr
    with open_store(saga_settings(url)) as store:
        order = store.get(uuid.UUID(order_id))
    assert order.lease_owner is None  # released: resume can continue at once
    assert order.payment_state == "requested"  # the intent stays for the next driver
