"""The `order-saga` command as users run it: a real process, one-line errors, exit codes."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from alembic import command as alembic_command
from sqlalchemy import text
from sqlmodel import SQLModel

from downstream.seed import ORDINARY_USER_ID, RICH_USER_ID, WIDGET_ID
from fsm.executor import Executor
from fsm.migrate import alembic_config, schema, upgrade
from fsm.registry import SERVICES
from fsm.store import Store, make_engine
from fsm.wiring import open_store
from order_saga.cli import first_free
from tests.support.in_process import Run, first_in_a_process
from tests.support.processes import Saga, command, run_cli
from tests.support.services import Downstream, answers, free_port
from tests.support.serving import Served
from tests.support.settings import saga_env, saga_settings
from tests.support.waiting import wait_until, wait_until_async

UNREACHABLE_PG = "postgresql+psycopg://postgres@127.0.0.1:1/nothing"  # nothing listens there
NO_DB = {"ORDER_SAGA_DATABASE_URL": UNREACHABLE_PG}  # a command got past its settings: no file


@pytest.mark.parametrize(
    ("args", "env", "message", "run"),
    first_in_a_process(
        [
            (["diagram", "--format", "jpeg"], {}, "Invalid value for '--format'"),
            (["diagram", "--order", "not-a-uuid"], {}, "is not an order id"),
            (["resume", "--limit", "0"], {}, "Invalid value for '--limit'"),
            (["resume", "--older-than", "-1"], {}, "Invalid value for '--older-than'"),
            (["serve", "--port", "70000"], {}, "Invalid value for '--port'"),
            (["nonsense"], {}, "No such command"),
            (
                ["db", "upgrade"],
                {"ORDER_SAGA_DATABASE_URL": "mysql://x"},
                "ORDER_SAGA_DATABASE_URL",
            ),
            (["resume"], {"ORDER_SAGA_MAX_ATTEMPTS": "many"}, "ORDER_SAGA_MAX_ATTEMPTS"),
            (["resume"], {"ORDER_SAGA_USER_URL": "ftp://x"}, "ORDER_SAGA_USER_URL"),
            (["services", "--state", "/nonexistent/dir/s.db"], {}, "unable to open database"),
            (["resume"], {"ORDER_SAGA_DATABASE_URL": UNREACHABLE_PG}, "Connection refused"),
            (
                ["worker"],
                {"ORDER_SAGA_DATABASE_URL": "sqlite:////nonexistent/dir/x.db"},
                "unable to open database",
            ),
            (
                ["resume", "--order", "00000000-0000-0000-0000-000000000000"],
                {"ORDER_SAGA_DATABASE_URL": UNREACHABLE_PG},
                "Connection refused",
            ),
            (
                ["webhooks", "list"],
                {"ORDER_SAGA_DATABASE_URL": UNREACHABLE_PG},
                "Connection refused",
            ),
            (["events", "list"], {"ORDER_SAGA_DATABASE_URL": UNREACHABLE_PG}, "Connection refused"),
            # Refused before the database is asked (the unreachable one would say so).
            *(
                (["webhooks", "add", url], {"ORDER_SAGA_DATABASE_URL": UNREACHABLE_PG}, message)
                for url, message in [
                    ("http://a..b/", "is not a valid host name"),
                    (f"http://{'x' * 64}.example/", "is not a valid host name"),
                    ("http://example.com:99999/", "the port is not a number"),
                    ("http://example.com:0/", "the port is not a number from 1 to 65535"),
                    ("http://ho st.example/", "is not a valid host name"),
                    ("http://hooks\u200b.example/in", "cannot contain '\\u200b'"),
                    (f"http://example.com/{'x' * 190}", "at most 200 characters"),
                ]
            ),
            (
                ["relay"],
                {"ORDER_SAGA_AMQP_URL": "amqp://u:p@rabbit:99999/", **NO_DB},
                "invalid ORDER_SAGA_AMQP_URL: Value error, has a port that is not a number",
            ),
            (
                ["relay"],
                {"ORDER_SAGA_AMQP_URL": "amqp:///", **NO_DB},
                "ORDER_SAGA_AMQP_URL: Value error, has no host",
            ),
            (
                ["relay"],
                {"ORDER_SAGA_EVENT_TIMEOUT": "20", "ORDER_SAGA_RELAY_LEASE": "30", **NO_DB},
                "must be below two thirds of ORDER_SAGA_RELAY_LEASE (30)",
            ),
        ]
    ),
)
def test_bad_input_is_one_line_and_a_non_zero_exit(
    args: list[str], env: dict[str, str], message: str, run: Run
) -> None:
    result = run(*args, **env)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("order-saga: "), result.stderr
    assert message in lines[0]


@pytest.mark.parametrize(
    ("args", "variable", "url", "run"),
    first_in_a_process(
        [
            (["webhooks", "list"], "DATABASE_URL", "postgresql+psycopg://u:hunter2@127.0.0.1:1/x"),
            (["events", "list"], "DATABASE_URL", "postgresql+psycopg://u:hunter2@127.0.0.1:1/x"),
        ]
    ),
)
def test_a_password_in_an_unusable_url_is_not_shown(
    args: list[str], variable: str, url: str, run: Run
) -> None:
    result = run(*args, **{f"ORDER_SAGA_{variable}": url})
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "hunter2" not in result.stdout + result.stderr


def test_db_upgrade_creates_the_schema(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/fresh.db"
    result = run_cli("db", "upgrade", ORDER_SAGA_DATABASE_URL=url)
    assert result.returncode == 0, result.stderr
    assert "database at head" in result.stdout
    assert run_cli("db", "upgrade", ORDER_SAGA_DATABASE_URL=url).returncode == 0


def test_serve_starts_on_a_database_the_next_release_migrated(tmp_path: Path) -> None:
    """A rolling deploy: an old `serve` restarted after the new release's `db upgrade`
    warns, naming both revisions, and serves without migrating (it crash-looped on
    alembic's "Can't locate revision")."""
    url = f"sqlite:///{tmp_path}/saga.db"
    upgrade(url)
    (head,) = schema(url).head
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0012_next_release'"))
    engine.dispose()
    served = Served(saga_env(database_url=url)).wait_ready()
    output = served.stop()
    assert "WARNING order_saga.migrate" in output, output
    assert f"database at revision 0012_next_release, ahead of this release's head {head}" in output
    assert schema(url).database == ("0012_next_release",)


async def test_resume_dry_run_then_resume(
    db_url: str, store: Store, downstream: Downstream
) -> None:
    env = saga_env(database_url=db_url, services_url=downstream.url)
    stuck, _ = await store.create_order(user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1)
    dry = run_cli("resume", "--older-than", "0", "--dry-run", **env)
    assert dry.returncode == 0, dry.stderr
    assert f"{stuck.id} pending: would resume" in dry.stdout
    assert store.get(stuck.id).state == "pending"  # --dry-run changes nothing

    done = run_cli("resume", "--older-than", "0", **env)
    assert done.returncode == 0, done.stderr
    assert "resumed 1, completed 1" in done.stdout
    assert store.get(stuck.id).state == "completed"
    assert downstream.effects()[f"{stuck.id}:payment:deduct"] == 1


def test_unknown_order_for_the_diagram_is_one_line(db_url: str, store: Store) -> None:
    result = run_cli(
        "diagram", "--order", "00000000-0000-0000-0000-000000000000", ORDER_SAGA_DATABASE_URL=db_url
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "order-saga: order 00000000-0000-0000-0000-000000000000 not found"
    )


async def test_diagram_of_one_order_highlights_its_path(db_url: str, store: Store) -> None:
    order, _ = await store.create_order(
        user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1, owner="t"
    )
    await store.record_transition(order=order, owner="t", scope="order", trigger="request_product")
    await store.record_transition(order=order, owner="t", scope="order", trigger="product_missing")
    whole = run_cli("diagram", "--format", "dot", ORDER_SAGA_DATABASE_URL=db_url)
    mine = run_cli(
        "diagram", "--format", "dot", "--order", str(order.id), ORDER_SAGA_DATABASE_URL=db_url
    )
    assert whole.returncode == mine.returncode == 0
    assert whole.stdout != mine.stdout
    assert "product_missing (2)" in mine.stdout  # the edge it took, numbered by its seq


@pytest.mark.slow
async def test_worker_stops_on_sigterm_releasing_its_leases(
    db_url: str, store: Store, downstream: Downstream
) -> None:
    env = saga_env(
        database_url=db_url, services_url=downstream.url, http_timeout=30, lease_seconds=60
    )
    downstream.fault("shipping.schedule", "delay", count=3, seconds=3)
    ids = [
        (await store.create_order(user_id=RICH_USER_ID, product_id=WIDGET_ID, quantity=1))[0].id
        for _ in range(3)
    ]
    with Saga(command("worker", "--interval", "0.1", "--older-than", "0"), env) as worker:
        wait_until(
            lambda: all(store.get(i).shipping_state == "requested" for i in ids),
            what="three shipping calls in flight",
            alive=worker.running,
        )
        stopped = worker.stop()  # SIGTERM: a deploy, with three calls in flight
    assert stopped.returncode == 0, stopped.explain()
    in_flight = [store.get(i) for i in ids]
    # Released at once (the lease had 60 s to go); the intent stays for the next driver.
    assert all(o.lease_owner is None for o in in_flight), (
        [(o.state, o.shipping_state, o.version, o.lease_owner) for o in in_flight],
        stopped.explain(),
    )
    assert all(o.state == "steps_running" and o.shipping_state == "requested" for o in in_flight)

    # Handed back, not merely unleased: the next driver takes them now, not only once they
    # have been still for the sweep's older-than (`resume`'s default: 60 s).
    done = run_cli("resume", **env)
    assert done.returncode == 0, done.stderr
    assert "resumed 3" in done.stdout, done.stdout
    assert all(store.get(i).status == "completed" for i in ids)
    effects = downstream.effects()
    assert all(effects[f"{i}:shipping:schedule"] == 1 for i in ids)


def _states(store: Store) -> dict[str, str]:
    with store.engine.connect() as conn:
        return {str(i): s for i, s in conn.execute(text("SELECT id, state FROM orders"))}


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
async def test_serve_picks_up_no_new_work_once_asked_to_stop(
    db_url: str, store: Store, downstream: Downstream, workers: str
) -> None:
    alembic_command.stamp(alembic_config(db_url), "head")  # the fixture's schema is current
    env = saga_env(
        database_url=db_url,
        services_url=downstream.url,
        shutdown_grace=30,
        sweep_interval=0.1,
        sweep_older_than=0,  # an unleased order is stuck at once: the sweep's at its next pass
    )
    downstream.fault("product.get", "delay", count=1, seconds=3)  # holds the grace open
    port = free_port()
    with Saga(command("serve", "--port", str(port), "--workers", workers), env) as serve:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: answers(f"{url}/healthz"), what="serve", alive=serve.running)
        body = {"user_id": RICH_USER_ID, "product_id": WIDGET_ID, "quantity": 1}
        placing = asyncio.create_task(
            asyncio.to_thread(httpx.post, f"{url}/orders", json=body, timeout=30)
        )
        await wait_until_async(  # the loop runs on: the request is sent meanwhile
            lambda: set(_states(store).values()) - {"pending"},
            what="the request's product lookup in flight",
        )
        serve.process.terminate()  # SIGTERM: a deploy, with that request in flight
        # Its shutdown has begun (the sweep is told first, then the socket closes).
        wait_until(lambda: not answers(f"{url}/healthz"), what="serve to stop listening")
        later = [
            (await store.create_order(user_id=RICH_USER_ID, product_id=WIDGET_ID, quantity=1))[0]
            for _ in range(3)
        ]
        placed = await placing  # answered within the grace: its run was not cut short
        stopped = serve.wait()
    assert stopped.returncode in (0, -signal.SIGTERM), stopped.explain()  # died of it, flushed
    assert placed.status_code == 201 and placed.json()["status"] == "completed", placed.text
    # Orders that came in after the stop began are the next engine's: never swept here.
    for order in later:
        now = store.get(order.id)
        assert (now.state, now.version, now.lease_owner) == ("pending", order.version, None), (
            stopped.explain()
        )


# What only serving, calling a service or publishing needs (`serve`, `services`, `relay`, a
# saga run): the web framework and server, the HTTP clients, the broker's client, sign-in,
# templates. A command that only talks to the database never imports them: every
# `order-saga` is an interpreter start (the suite starts hundreds), and these libraries
# were most of one (~1 s of `orders list` on a quiet 2-core machine, before).
SERVING = ("fastapi", "uvicorn", "aio_pika", "authlib", "jinja2", "itsdangerous")
CALLING = ("aiohttp", "httpx")
# What only a command that opens the database needs: `--help` lists every command and its
# choices (the key roles, the order statuses) without them (0.5 s instead of 1.2 s).
DATABASE = ("sqlalchemy", "sqlmodel", "psycopg", "pydantic", "alembic")
MODULES_AFTER = """
import json, sys
from order_saga.cli import main
sys.argv[0] = "order-saga"
try:
    main()
except SystemExit as exit:
    print(json.dumps([exit.code, sorted({m.split(".")[0] for m in sys.modules})]))
"""


@pytest.mark.parametrize(
    ("args", "says", "absent"),
    [
        (["--help"], "Durable order orchestrator", SERVING + CALLING + DATABASE),
        (["orders", "list"], "{order}", SERVING + CALLING),
        (["orders", "show", "{order}", "--json"], "{order}", SERVING + CALLING),  # API shapes
        (["keys", "list"], "no keys", SERVING + CALLING),
        (["resume", "--order", "{order}", "--dry-run"], "would resume", SERVING),  # no call
    ],
)
async def test_a_command_that_talks_only_to_the_database_imports_no_server_or_client(
    tmp_path: Path, args: list[str], says: str, absent: tuple[str, ...]
) -> None:
    url = f"sqlite:///{tmp_path}/saga.db"  # which database does not change what is imported
    engine = make_engine(url)
    SQLModel.metadata.create_all(engine)
    engine.dispose()
    with open_store(saga_settings(url)) as store:
        order, _ = await store.create_order(
            user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1
        )
    argv = [a.format(order=order.id) for a in args]
    result = subprocess.run(
        [sys.executable, "-c", MODULES_AFTER, *argv],
        env=saga_env(database_url=url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    *output, last = result.stdout.splitlines()
    code, modules = json.loads(last)
    assert code in (0, None), result.stderr
    assert says.format(order=order.id) in "\n".join(output), result.stdout  # it did its job
    assert sorted(set(absent) & set(modules)) == []


# Square brackets are rich markup ("[red]", "[/b]"), colons emoji codes (":x:"): a URL, a
# reason or an error from the database is printed as it is, never as markup.
MARKUP_URL = "http://127.0.0.1:9/a[/b]?x=[red]y:x:"
BRACKETS_URL = "http://127.0.0.1:9/hook?filter[status]=paid&events[]=x"


async def test_the_tables_print_urls_reasons_and_errors_as_they_are(
    db_url: str, store: Store
) -> None:
    from sqlalchemy import text

    from fsm import outbox, subscriptions

    for url in (MARKUP_URL, BRACKETS_URL):
        subscriptions.add_webhook(store, url, outbox.DEFAULT_TYPES)
    order, _ = await store.create_order(  # its order.created event, listed per destination
        user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1
    )
    with store.engine.begin() as conn:
        conn.execute(
            text(  # parked: the reason is shown only then
                "UPDATE orders SET attention_reason = :r, last_error = :e,"
                " state = 'needs_attention', status = 'needs_attention' WHERE id = :id"
            ),
            {
                "r": "refund [bold]of[/] [/x] :x:",
                "e": "HTTP 500 [/red]",
                "id": order.id.hex if store.engine.dialect.name == "sqlite" else order.id,
            },
        )
    env = {"ORDER_SAGA_DATABASE_URL": db_url}
    listed = run_cli("webhooks", "list", **env)
    assert listed.returncode == 0, listed.stderr
    assert MARKUP_URL in listed.stdout and BRACKETS_URL in listed.stdout
    events = run_cli("events", "list", **env)
    assert events.returncode == 0, events.stderr
    assert MARKUP_URL in events.stdout and BRACKETS_URL in events.stdout
    shown = run_cli("orders", "show", str(order.id), **env)
    assert shown.returncode == 0, shown.stderr
    assert "needs attention: refund [bold]of[/] [/x] :x:" in shown.stdout
    assert "last error: HTTP 500 [/red]" in shown.stdout
    # What the list shows is what `webhooks remove` finds.
    removed = run_cli("webhooks", "remove", BRACKETS_URL, **env)
    assert removed.returncode == 0, removed.stderr


def test_worker_metrics_on_a_host_it_cannot_bind_is_a_usage_error(
    tmp_path: Path,
) -> None:
    """Not "ports 19500-19515 are all taken" and a worker running on without /metrics: the
    next port would fail the same way. One line, exit 2."""
    url = f"sqlite:///{tmp_path}/saga.db"
    assert run_cli("db", "upgrade", ORDER_SAGA_DATABASE_URL=url).returncode == 0
    args = ("--metrics-host", "no.such.host.invalid", "--metrics-port", "19500")
    services = json.dumps({s.name: "http://127.0.0.1:9/" for s in SERVICES})  # not called
    result = run_cli("worker", *args, ORDER_SAGA_DATABASE_URL=url, ORDER_SAGA_SERVICES=services)
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        "order-saga: --metrics-host: cannot serve /metrics on no.such.host.invalid:19500:"
        " gaierror: [Errno -2] Name or service not known\n"
    )


@pytest.mark.parametrize("args", [("worker",), ("resume",), ("resume", "--older-than", "0")])
def test_worker_or_resume_with_no_service_url_and_no_serve_to_call_is_refused(
    db_url: str, args: tuple[str, ...]
) -> None:
    """No service URL set: the fallback is a `serve`'s embedded services. Nothing answering
    there, a worker drove real orders into failed calls (charged ones parked refund-pending)
    and a resume likewise; now each stops at start, naming the settings. A dry run calls
    no service: it still lists."""
    fallback = f"http://127.0.0.1:{free_port()}/services"  # nothing listens there
    env = {"ORDER_SAGA_DATABASE_URL": db_url, "ORDER_SAGA_FALLBACK_SERVICES_URL": fallback}
    refused = run_cli(*args, **env)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    (line,) = refused.stderr.strip().splitlines()
    assert line.startswith("order-saga: no service URLs are set (ORDER_SAGA_SERVICES, "), line
    assert f"ORDER_SAGA_FALLBACK_SERVICES_URL {fallback}" in line and "refused" in line, line
    if args[0] == "resume":
        listed = run_cli(*args, "--dry-run", **env)
        assert listed.returncode == 0, listed.stderr


async def test_orders_cancel_with_no_service_url_and_no_serve_to_call_is_refused(
    db_url: str, executor: Executor, downstream: Downstream
) -> None:
    """A cancellation refunds, restores and cancels the shipment: with no service to call
    it was committed and then left `cancelling` on failed calls. Now it stops at start,
    naming the settings, and the order is still completed, its money where it was."""
    done, _ = await executor.store.create_order(
        user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1
    )
    assert (await executor.run(done.id)).state == "completed"
    balance = downstream.balance(ORDINARY_USER_ID)
    fallback = f"http://127.0.0.1:{free_port()}/services"  # nothing listens there
    env = {"ORDER_SAGA_DATABASE_URL": db_url, "ORDER_SAGA_FALLBACK_SERVICES_URL": fallback}
    refused = await asyncio.to_thread(run_cli, "orders", "cancel", str(done.id), **env)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    (line,) = refused.stderr.strip().splitlines()
    assert line.startswith("order-saga: no service URLs are set (ORDER_SAGA_SERVICES, "), line
    order = executor.store.get(done.id)
    assert (order.state, order.cancel_requested) == ("completed", False)
    assert downstream.balance(ORDINARY_USER_ID) == balance
    # An order that cannot be cancelled is refused for that, services or none (exit 1).
    pending, _ = await executor.store.create_order(
        user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1
    )
    not_yet = await asyncio.to_thread(run_cli, "orders", "cancel", str(pending.id), **env)
    assert not_yet.returncode == 1, not_yet.stdout + not_yet.stderr
    assert not_yet.stderr == (
        "order-saga: only a completed order can be cancelled (it is pending)\n"
    ), not_yet.stderr


def test_worker_metrics_take_the_next_port_only_when_one_is_in_use() -> None:
    tried: list[int] = []

    def serve(port: int) -> None:
        tried.append(port)
        if port < 9466:
            raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))

    assert first_free(9464, serve) == 9466 and tried == [9464, 9465, 9466]

    def refused(port: int) -> None:
        raise OSError(errno.EADDRNOTAVAIL, os.strerror(errno.EADDRNOTAVAIL))

    with pytest.raises(OSError, match="Cannot assign requested address"):
        first_free(9464, refused)


def test_services_on_a_port_in_use_is_one_line_and_exit_1(tmp_path: Path) -> None:
    """As `serve`: uvicorn's `ERROR: [Errno 98] ...` and exit 3 before."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = run_cli("services", "--port", port, "--state", str(tmp_path / "s.db"))
    assert result.returncode == 1, result.stderr
    assert result.stderr == "order-saga: OSError: [Errno 98] Address already in use\n"


def test_services_logs_a_start_line_and_each_request(tmp_path: Path) -> None:
    """`order-saga services` wrote nothing at all (no start line, no access log)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    state = tmp_path / "services.db"
    env = saga_env(database_url=f"sqlite:///{tmp_path}/saga.db")
    argv = command("services", "--port", str(port), "--state", str(state))
    with Saga(argv, env) as services:
        wait_until(lambda: answers(f"{base}/products/{WIDGET_ID}"), alive=services.running)
        stopped = services.stop()
    assert f"INFO order_saga.start [-] reference services on {base}, their state in {state}" in (
        stopped.stderr
    ), stopped.explain()
    assert f'"GET /products/{WIDGET_ID} HTTP/1.1" 200' in stopped.stderr, stopped.explain()
