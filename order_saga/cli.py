"""The `order-saga` console script: serve | services | worker | resume | diagram | db |
check-upgrade, `orders` (order_saga/orders_cli.py), `prune` and `archive`
(order_saga/prune_cli.py).

Bad input (flags, ORDER_SAGA_* settings, ids) ends in one line on stderr and exit code 2
(order_saga/console.py). Every command gets its engine from `fsm.wiring` (`open_saga`,
`open_store`, `open_engine` for the read pool alone: with the settings' DB_LOCK_TIMEOUT and
DB_STATEMENT_TIMEOUT), never builds one (`db upgrade` and `serve` migrate through
`fsm.migrate`, whose waits are a migration's), and imports `api`, `downstream` and the
wiring inside the command that needs them, so `order-saga --help` stays fast.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import signal
import sys
from collections.abc import Callable
from datetime import datetime, timedelta
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.exceptions import TyperException

from fsm.errors import ConcurrencyError, SagaError
from fsm.text import masked
from order_saga import heap
from order_saga.console import (
    database_settings,
    environment_errors,
    fail,
    load_settings,
    one_line,
    parse_order_id,
    require_services,
    running_with,
    seconds_option,
    version_option,
)
from order_saga.events_cli import events_app, webhooks_app
from order_saga.keys_cli import keys_app
from order_saga.orders_cli import orders_app
from order_saga.prune_cli import archive_app, prune

if TYPE_CHECKING:  # imported by the commands that use them: `order-saga --help` stays fast
    from fsm.migrate import Schema
    from fsm.models import Order
    from fsm.settings import Settings

app = typer.Typer(
    help="Durable order orchestrator.", pretty_exceptions_enable=False, add_completion=False
)
db_app = typer.Typer(help="Database schema.")
app.add_typer(db_app, name="db")
# Operator console (issue 9): `orders list|show|cancel|resolve` and `--version`.
app.add_typer(orders_app, name="orders")
# Client keys with roles (issue 17).
app.add_typer(keys_app, name="keys")
app.callback()(version_option)
# Retention (issue 22): `prune` and `archive show`.
app.command("prune")(prune)
app.add_typer(archive_app, name="archive")
# Order events (issue 19): `webhooks add|list|remove|rotate|test`, `events list|redeliver`.
app.add_typer(webhooks_app, name="webhooks")
app.add_typer(events_app, name="events")


def configure_logging(settings: Settings | None = None, level: int = logging.INFO) -> None:
    """Our INFO lines (transitions, sweep summaries, stopped runs), text or JSON."""
    from order_saga.logs import configure

    configure((settings or load_settings()).log_format, level)


def _migrate(settings: Settings, *, apply: bool = True) -> Schema:
    """Up to this release's head (`apply=False`: only check it is there); a database a
    newer release migrated is left as it is, its `Schema` says so (`ahead`)."""
    from fsm.migrate import IncompatibleSchema, migrate

    try:
        return migrate(settings.database_url, apply=apply)
    except IncompatibleSchema as exc:  # says what to do
        fail(f"{masked(settings.database_url)}: {exc}", 1)
    except Exception as exc:  # unreachable database, bad URL, ...
        fail(f"cannot migrate {masked(settings.database_url)}: {one_line(exc)}", 1)


def _check_clock(settings: Settings) -> None:
    """This host's clock against the database's (fsm.clock), before `serve` forks or
    serves: too far off, it stops in one line as the other commands do (inside the app's
    start-up uvicorn would print it in a traceback)."""
    from fsm.clock import ClockSkew, check_database_clock
    from fsm.wiring import open_engine

    with open_engine(settings) as engine:
        try:
            check_database_clock(engine, lease_seconds=settings.lease_seconds)
        except ClockSkew as exc:
            fail(str(exc), 1)


def _any_keys(settings: Settings) -> bool:
    """Whether the database holds a client key (the API then asks for credentials)."""
    from fsm.keys import any_keys
    from fsm.wiring import open_engine

    with open_engine(settings) as engine:
        return any_keys(engine=engine)


def _log_running_with(settings: Settings, *, keys: bool, embedded: str) -> None:
    """One INFO line at start: what this process runs with (`running_with`), before
    `serve` forks or serves."""
    from order_saga.logs import flush

    configure_logging(settings)
    line = running_with(settings, keys=keys, embedded=embedded)
    logging.getLogger("order_saga.start").info("%s", line)
    flush()  # written now; the process configures its logging again to serve


def _warn_if_ahead(settings: Settings, schema: Schema) -> None:
    """A rolling deploy's window: the next release migrated the database while this one
    (re)starts. Said once, as a log line, before `serve` forks or serves."""
    if not schema.ahead:
        return
    from order_saga.logs import flush

    configure_logging(settings)
    logging.getLogger("order_saga.migrate").warning("%s", schema.line())
    flush()  # written now; the process configures its logging again to serve


def embedded_services_url(host: str, port: int) -> str:
    """Where `serve`'s own process reaches the reference services it embeds: the address
    it listens on (loopback for a wildcard), an IPv6 literal in brackets."""
    local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    if ":" in local:
        local = f"[{local}]"
    return f"http://{local}:{port}/services"


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    sweep: Annotated[
        bool,
        typer.Option(
            help="Periodically resume stuck orders (--no-sweep: not here; retention, the"
            " heatmap roll-up and partitions still run).",
        ),
    ] = True,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            max=64,
            help="Processes sharing the port, each with its own engine (about one per core).",
        ),
    ] = 1,
    migrate: Annotated[
        bool,
        typer.Option(
            help="Apply migrations first (--no-migrate: they are a deploy step of their own;"
            " a database behind this release is then refused).",
        ),
    ] = True,
) -> None:
    """Apply migrations and serve the API (plus the reference services when no
    downstream URLs are configured). A database a newer release already migrated is
    served as it is, with a warning naming both revisions."""
    import uvicorn

    from order_saga.server import DrainingServer, listeners, serve_processes, uvicorn_options

    # --no-migrate: the database must be there already (a SQLite file is not created)
    settings = load_settings() if migrate else database_settings()
    if workers == 1:  # bound before anything starts: a port in use, a bad host, one line
        try:  # (not listening: a client meanwhile is refused, not held through migrations)
            [sock] = listeners(host, port, 1, listen=False)
        except OSError as exc:  # as `--workers N` says it (main's environment errors)
            fail(one_line(exc), 1)
    _warn_if_ahead(settings, _migrate(settings, apply=migrate))
    _check_clock(settings)
    # Said once the port is ours (a port in use is one line, alone).
    said = partial(
        _log_running_with, settings, keys=_any_keys(settings), embedded="embedded, under /services"
    )
    embedded = embedded_services_url(host, port)

    def application() -> Any:  # in each process (`--workers N`: after the fork)
        from api.app import create_app  # and prometheus_client with it (order_saga.metrics_dir)

        app = create_app(settings, embedded_url=embedded, sweep=sweep)
        heap.settle()
        return app

    if workers > 1:  # every process sweeps too: leases keep an order to one driver
        options = {"log_level": "info", **uvicorn_options(settings)}
        code = serve_processes(
            application,
            host=host,
            port=port,
            workers=workers,
            options=options,
            before_serving=lambda: configure_logging(settings),
            pin=settings.pin_workers,
            bound=said,
        )
        raise typer.Exit(code)
    said()
    configure_logging(settings)
    # uvicorn re-raises the SIGTERM it shut down on once it has; by default that ends the
    # process before atexit writes the queued log lines (its "Application shutdown
    # complete" among them): this handler, restored by uvicorn, writes them first.
    signal.signal(signal.SIGTERM, _flush_then_die)
    config = uvicorn.Config(  # host and port only name the socket in uvicorn's log line
        application(),
        host=host,
        port=port,
        log_level="info",
        log_config=None,
        **uvicorn_options(settings),
    )
    server = DrainingServer(config)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: a clean stop, as uvicorn.run
        server.run(sockets=[sock])
    if not server.started:  # the app's start-up failed (logged): uvicorn.run's exit code
        raise typer.Exit(3)


def _flush_then_die(signum: int, _frame: object) -> None:
    """Write the queued log lines, then die of `signum` as the default handler would."""
    from order_saga.logs import flush

    flush()
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)


@app.command()
def services(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8100,
    state: Annotated[
        str | None,
        typer.Option(help="SQLite file for their state (default: ORDER_SAGA_SERVICES_DB)."),
    ] = None,
    access_log: Annotated[
        bool, typer.Option(help="Log each request (off: the start line and errors only).")
    ] = True,
) -> None:
    """Serve the four reference services (and /_faults) alone. Logs as `serve` does: a
    start line, then each request (access log), text or JSON (ORDER_SAGA_LOG_FORMAT)."""
    import uvicorn

    from api.guard import BodyGuard
    from downstream.app import create_services_app
    from order_saga.server import DrainingServer, listeners, uvicorn_options

    settings = load_settings()
    path = state or settings.services_db
    # The same body cap and strict JSON as when they are mounted under serve's /services.
    guarded = BodyGuard(
        create_services_app(path),
        max_bytes=settings.max_body_bytes,
        read_timeout=settings.body_timeout,
    )
    try:  # bound before serving, as `serve`: a port in use is one line, exit 1
        [sock] = listeners(host, port, 1, listen=False)
    except OSError as exc:
        fail(one_line(exc), 1)
    heap.settle()
    configure_logging(settings)
    where = f"[{host}]" if ":" in host else host
    start = logging.getLogger("order_saga.start")
    start.info("reference services on http://%s:%s, their state in %s", where, port, path)
    signal.signal(signal.SIGTERM, _flush_then_die)  # as `serve`: the queued lines written
    config = uvicorn.Config(
        guarded,
        host=host,
        port=port,
        log_level="info",
        log_config=None,
        access_log=access_log,
        **uvicorn_options(settings),
    )
    server = DrainingServer(config)
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=[sock])
    if not server.started:
        raise typer.Exit(3)


@app.command()
def resume(
    older_than: Annotated[
        float,
        seconds_option(
            "Only orders unmoved this long (seconds); parked ones (needs_attention, "
            "unleased) whatever their age."
        ),
    ] = 60.0,
    limit: Annotated[int, typer.Option(min=1, max=100_000)] = 100,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List, change nothing.")] = False,
    order: Annotated[str | None, typer.Option(help="Resume this one order id.")] = None,
    as_name: Annotated[
        str | None, typer.Option("--as", help="Who is resuming (each order's audit row).")
    ] = None,
    reason: Annotated[str | None, typer.Option(help="Why (kept in each order's log).")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON summary on stdout, no progress lines.")
    ] = False,
    include_held: Annotated[
        bool,
        typer.Option(
            "--include-held",
            help="Also drive orders held after their driver died under them "
            "MAX_INTERRUPTIONS times in a row (else left alone, and named).",
        ),
    ] = False,
) -> None:
    """Drive stuck (non-terminal, unleased) orders to a terminal state; print a summary.
    Exit 0 only when every order taken ended terminal. Otherwise, the first that applies:
    1 a run failed with an error; 3 some stay parked (needs_attention), each printed with
    its reason; 4 some are not finished (still running: a later resume continues them),
    were held by another driver (skipped, or lost to one mid-run) or are held for an
    operator (their driver died under them again and again: left alone unless
    --include-held; `--order ID` takes one). Bad input (a flag or a
    setting; no service URL set and nothing at the fallback) exits 2 before anything runs.
    A dry run exits 0. Each
    order resumed gets a row in its log naming who (`--as`, default the local admin)."""
    import asyncio  # here: `--version`, `diagram` and the rest need none of it

    from fsm.machine import OperatorAction, Status
    from fsm.recovery import resume_stuck
    from fsm.store import utcnow
    from fsm.wiring import open_saga
    from order_saga.orders_cli import cli_audit
    from order_saga.resume_report import ResumeReport, report

    oid = None if order is None else parse_order_id(order, "--order: ")
    settings = database_settings()
    # Warnings only (parks, lost leases): stdout is the report, one line per order.
    configure_logging(settings, logging.WARNING)

    def say(line: str) -> None:
        if not as_json:
            typer.echo(line)

    async def main() -> ResumeReport:
        async with open_saga(settings) as saga:
            executor = saga.executor
            if not dry_run:  # a dry run calls no service
                await asyncio.to_thread(require_services, settings)
            audit = cli_audit(OperatorAction.RESUME, as_name, reason)
            if oid is not None:
                if dry_run:  # read only: no lease, no transition, no call
                    found = executor.store.get(oid)
                    what, counts = _dry_run_verdict(found, utcnow())
                    say(f"{found.id} {found.state} ({found.status}): {what}")
                    return report([found], dry_run=True, counts=counts)
                result = await executor.run(oid, audit=audit)
                say(f"{result.id} {result.state} ({result.status})")
                return report([result], dry_run=False, counts={"found": 1, "resumed": 1})
            seen: list[Order] = []
            done = itertools.count(1)
            # How many there are to do now (others may turn up while it runs).
            stuck = await asyncio.to_thread(
                executor.store.find_stuck,
                moved_before=utcnow() - timedelta(seconds=older_than),
                limit=limit,
                due_only=False,
            )
            max_interruptions = executor.store.max_interruptions
            left_held = [] if include_held else [o for o in stuck if o.held(max_interruptions)]
            todo = len(stuck) - (0 if dry_run else len(left_held))  # a dry run lists them

            def progress(o: Order, what: str) -> None:
                if dry_run and o.status == Status.NEEDS_ATTENTION:
                    what = f"{what}; parked now: {o.attention_reason}"
                say(f"[{next(done)}/{todo}] {o.id} {o.state}: {what}")
                seen.append(o)

            summary = await resume_stuck(
                store=executor.store,
                executor=executor,
                older_than=older_than,
                limit=limit,
                dry_run=dry_run,
                concurrency=settings.sweep_concurrency,
                due_only=False,
                progress=progress,
                audit=audit,
                take_held=include_held,
            )
            if not dry_run:
                summary.held = len(left_held)
            if dry_run:
                say(
                    f"would resume {summary.found}, "
                    f"skipped (leased elsewhere) {summary.skipped_leased}"
                    + (f", held (left alone) {summary.held}" if summary.held else "")
                )
            else:
                say(summary.line())
            elsewhere = summary.skipped_leased + summary.lost_to_other_driver
            figures = summary.as_dict()
            return report(
                seen,
                dry_run=dry_run,
                held=elsewhere,
                errors=summary.errors,
                counts=figures,
                left_held=left_held,
            )

    import uvloop

    try:
        outcome = uvloop.run(main())
    except ConcurrencyError as exc:  # --order held by another driver: not finished here
        fail(str(exc), 4)
    except SagaError as exc:  # unknown order, ...
        fail(str(exc), 1)
    for note in outcome.notes:  # what is left to do
        typer.echo(note, err=True)
    if as_json:
        typer.echo(json.dumps(outcome.summary, indent=2))
    raise typer.Exit(outcome.code)


def _dry_run_verdict(order: Order, now: datetime) -> tuple[str, dict[str, int]]:
    """What `resume --order ID` would do with `order` now, and the summary's counts (the
    sweep's rule: a terminal order is done, a live lease is another driver's)."""
    from fsm.machine import OrderState, is_terminal
    from fsm.why import at_utc

    if is_terminal(order.state):
        return "terminal: nothing to do", {"found": 0, "skipped_leased": 0}
    if order.leased_at(now):
        assert order.lease_expires_at is not None
        until = at_utc(order.lease_expires_at)
        return f"leased by {order.lease_owner} until {until}", {"found": 0, "skipped_leased": 1}
    what = "would resume"
    if order.state == OrderState.NEEDS_ATTENTION:
        what += f"; parked now: {order.attention_reason}"
    return what, {"found": 1, "skipped_leased": 0}


# Workers sharing a host each take the first free port from WORKER_METRICS_PORT up, so
# a second worker never fails on "address already in use": scrape the range (9464-9479).
METRICS_PORTS = 16


def first_free(start: int, serve: Callable[[int], object]) -> int | None:
    """Call `serve(port)` on the first port from `start` that binds; None if all are in
    use. Any other OSError (a host that does not resolve or is not this machine's, a port
    not ours to bind) is raised: the next port would fail the same way."""
    for port in range(start, min(start + METRICS_PORTS, 65536)):
        try:
            serve(port)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                continue
            raise
        return port
    return None


@app.command()
def worker(
    interval: Annotated[
        float | None,
        seconds_option("Seconds between sweeps (default ORDER_SAGA_SWEEP_INTERVAL).", min=0.01),
    ] = None,
    older_than: Annotated[
        float | None,
        seconds_option("Only orders unmoved this long (default ORDER_SAGA_SWEEP_OLDER_THAN)."),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=65535,
            help="Serve /metrics here (default ORDER_SAGA_WORKER_METRICS_PORT; 0: off).",
        ),
    ] = None,
    metrics_host: Annotated[str, typer.Option(help="Interface for /metrics.")] = "127.0.0.1",
) -> None:
    """Claim and advance stuck orders forever (run several; they share the load). With no
    service URL set, a `serve` must answer at ORDER_SAGA_FALLBACK_SERVICES_URL (else exit 2)."""
    import asyncio

    from fsm import upkeep
    from fsm.keys import any_keys
    from fsm.recovery import sweep_forever

    settings = load_settings()
    updates: dict[str, float] = {}
    if interval is not None:
        updates["sweep_interval"] = interval
    if older_than is not None:
        updates["sweep_older_than"] = older_than
    if metrics_port is not None:
        updates["worker_metrics_port"] = metrics_port
    settings = settings.model_copy(update=updates)
    configure_logging(settings)

    async def main() -> None:
        from fsm.wiring import open_saga

        # The upgrade guard: orders this machine cannot drive are logged, never swept.
        async with open_saga(
            settings, breakers=True, upgrade_guard=True, require_database=True
        ) as saga:
            heap.settle()  # started: the engine and its modules are loaded
            executor = saga.executor
            await asyncio.to_thread(require_services, settings)  # no URL, no serve: exit 2
            if settings.worker_metrics_port:
                from prometheus_client import start_http_server

                from fsm.metrics import of_store

                registry_ = of_store(executor.store)  # what serve's /metrics serves
                serve_metrics = partial(start_http_server, addr=metrics_host, registry=registry_)
                log = logging.getLogger("order_saga.worker")
                try:
                    port = first_free(settings.worker_metrics_port, serve_metrics)
                except OSError as exc:  # not a port taken: nothing to serve /metrics on
                    where = f"{metrics_host}:{settings.worker_metrics_port}"
                    fail(f"--metrics-host: cannot serve /metrics on {where}: {one_line(exc)}")
                if port is None:
                    log.warning(
                        "no /metrics: ports %s-%s are all taken (set --metrics-port)",
                        settings.worker_metrics_port,
                        settings.worker_metrics_port + METRICS_PORTS - 1,
                    )
                else:
                    log.info("/metrics on http://%s:%s/metrics", metrics_host, port)
            # Said once set up (a /metrics it cannot serve is a usage error, alone).
            keys = await asyncio.to_thread(any_keys, engine=executor.store.engine)
            where = settings.fallback_services_url
            line = running_with(settings, keys=keys, embedded=f"a serve's, at {where}")
            logging.getLogger("order_saga.start").info("%s", line)
            # Retention, roll-up, partitions and the relay child (fsm.upkeep, as serve's):
            # cancelled and awaited when the sweep has stopped, before the store closes.
            async with upkeep.running(store=executor.store, settings=settings):
                sweep = asyncio.create_task(
                    sweep_forever(store=executor.store, executor=executor, settings=settings)
                )
                # SIGTERM (a deploy) or Ctrl-C: stop driving and release every lease now,
                # so another worker continues at once instead of after the lease expires. A
                # call in flight is abandoned; its committed intent makes the next driver
                # reconcile.
                loop = asyncio.get_running_loop()
                for signum in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(signum, sweep.cancel)
                with contextlib.suppress(asyncio.CancelledError):
                    await sweep
            logging.getLogger("order_saga.worker").info("stopped, leases released")

    import uvloop

    uvloop.run(main())  # as serve's loop (uvicorn picks uvloop)


@app.command()
def relay(
    child: Annotated[
        bool, typer.Option("--child", hidden=True, help="started by serve/worker")
    ] = False,
) -> None:
    """Deliver order events to every destination (webhooks, RabbitMQ) until stopped; run
    several, they share the work. `serve` and `worker` run one too (ORDER_SAGA_RELAY)."""
    import asyncio

    from fsm import relay_child
    from fsm.relay import Relay
    from fsm.wiring import close_store, relay_store

    # --child: the relay of a `serve` or `worker` (fsm.relay_child), its settings on stdin.
    settings = relay_child.read_parent_settings() if child else database_settings()
    relay_child.yield_to_orders(settings)
    configure_logging(settings)

    async def main() -> None:
        store = relay_store(settings)
        try:
            await asyncio.to_thread(store.count_by_status)  # fail fast if the DB is not there
            if settings.amqp_url:  # loaded before settle(), so it is frozen with the rest
                import fsm.destinations.amqp  # noqa: F401
            heap.settle()  # started: every delivery's garbage is young (order_saga.heap)
            report = relay_child.report if child else None
            task = asyncio.create_task(Relay(store, settings, report=report).run())
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, task.cancel)
            if child:  # the parent gone (stdin at its end): stop as on SIGTERM
                relay_child.on_parent_gone(lambda: loop.call_soon_threadsafe(task.cancel))
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            await asyncio.to_thread(close_store, store)

    import uvloop

    uvloop.run(main())


class DiagramFormat(StrEnum):
    mermaid = "mermaid"
    dot = "dot"
    svg = "svg"
    png = "png"


@app.command()
def diagram(
    format: Annotated[DiagramFormat, typer.Option("--format", "-f")] = DiagramFormat.mermaid,
    output: Annotated[Path | None, typer.Option("--output", "-o")] = None,
    order: Annotated[str | None, typer.Option(help="Highlight this order's path.")] = None,
) -> None:
    """Export the state diagram (optionally with one order's path highlighted)."""
    from fsm import diagram as diagrams

    history = None
    if order is not None:
        from fsm.errors import CorruptOrder, OrderNotFound
        from fsm.wiring import open_store

        oid = parse_order_id(order, "--order: ")
        try:
            with open_store(database_settings()) as store:
                store.get(oid)
                history = store.history(oid)
        except (OrderNotFound, CorruptOrder) as exc:  # corrupt: a state no machine declares
            fail(str(exc), 1)
        except environment_errors() as exc:
            fail(f"cannot read the database: {one_line(exc)}", 1)
    try:
        document = diagrams.render(format.value, history)
    except diagrams.GraphvizMissing as exc:
        fail(str(exc), 1)
    if output is None:
        if format in (DiagramFormat.png,) and sys.stdout.isatty():
            fail("refusing to write PNG to a terminal: use --output FILE")
        sys.stdout.buffer.write(document)
        sys.stdout.flush()
    else:
        output.write_bytes(document)
        typer.echo(f"wrote {output}", err=True)
    from fsm.version import MACHINE_VERSION

    typer.echo(f"machine version {MACHINE_VERSION}", err=True)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply all migrations (same as `alembic upgrade head`)."""
    settings = load_settings()
    schema = _migrate(settings)
    if schema.ahead:  # a newer release's revision: nothing of ours to apply, nothing undone
        typer.echo(f"{schema.line()} ({masked(settings.database_url)})")
        return
    typer.echo(f"database at head: {masked(settings.database_url)}")


# -- check-upgrade (issue 10) ----------------------------------------------------------------


@app.command("check-upgrade")
def check_upgrade(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document.")] = False,
    ids: Annotated[
        int, typer.Option(min=0, max=100_000, help="Order ids listed per stranded group.")
    ] = 1000,
) -> None:
    """Check every live order against the installed machine; exit 1 if any would be
    stranded (unknown state or step state, or no path left to a terminal state). Also
    says where the database's revision stands against this release's head: exit 1 when
    it is a newer release's that dropped a table or column this release uses."""
    import json

    from fsm.migrate import schema as read_schema
    from fsm.upgrade import check
    from fsm.wiring import open_engine

    settings = database_settings()
    with open_engine(settings) as engine:
        try:
            schema = read_schema(settings.database_url, engine)
        except environment_errors() as exc:
            fail(f"cannot read the database: {one_line(exc)}", 1)
        if schema.missing:  # this release's queries would fail on it: nothing more to check
            if as_json:
                typer.echo(json.dumps({"ok": False, "schema": schema.as_json()}, indent=2))
            else:
                typer.echo(f"{schema.line()}: run the release that migrated it")
            raise typer.Exit(1)
        try:
            report = check(engine, with_ids=ids)
        except environment_errors() as exc:
            fail(f"cannot read the database: {one_line(exc)}", 1)
    if as_json:
        typer.echo(json.dumps({**report.as_json(), "schema": schema.as_json()}, indent=2))
    else:
        lines = report.lines()
        for line in [lines[0], schema.line(), *lines[1:]]:
            typer.echo(line)
    raise typer.Exit(0 if report.ok else 1)


def main() -> None:
    """Entry point: usage errors become one line (`order-saga: …`) and a non-zero exit."""
    command = typer.main.get_command(app)
    try:
        code = command.main(
            args=sys.argv[1:] or ["--help"], prog_name="order-saga", standalone_mode=False
        )
    except TyperException as exc:  # bad flag, unknown command, missing argument
        typer.echo(f"order-saga: {exc.format_message()}", err=True)
        code = exc.exit_code
    except typer.Abort:
        code = 130
    except Exception as exc:
        if not isinstance(exc, environment_errors()):
            raise
        # database or service unreachable, unwritable file
        typer.echo(f"order-saga: {masked(one_line(exc))}", err=True)
        code = 1
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
