"""`order-saga webhooks add|list|remove|rotate|test` and `order-saga events list|redeliver`:
the operator's side of order events from a shell (fsm.subscriptions does the work). A table
for people, `--json` for scripts. A signing secret is printed once, by `add` or `rotate`,
and never again.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from order_saga.console import rich_console

if TYPE_CHECKING:
    from fsm.store import Store

webhooks_app = typer.Typer(help="Webhook subscriptions to order events.", no_args_is_help=True)
events_app = typer.Typer(help="Order events: deliveries and dead letters.", no_args_is_help=True)
JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"order-saga: {message}", err=True)
    raise typer.Exit(code)


@contextmanager
def _store() -> Iterator[Store]:
    from fsm.wiring import build_store, close_store
    from order_saga.console import database_settings

    store = build_store(database_settings())
    try:
        yield store
    finally:
        close_store(store)


@webhooks_app.command("add")
def add(
    url: Annotated[str, typer.Argument(help="Where to POST events (http:// or https://).")],
    events: Annotated[
        list[str] | None,
        typer.Option(
            "--events",
            help="Event types (repeat or comma-separate); default: every type but the "
            "opt-in order.compensating.",
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Subscribe URL to order events; prints its signing secret, once. The URL is stored
    normalised (scheme and host lower-case, no default port, no empty query or fragment);
    one already subscribed, however written (a trailing slash aside), is refused."""
    from fsm import outbox, subscriptions
    from order_saga.console import load_settings

    try:
        types = outbox.parse_types(events or [])
    except ValueError as exc:
        _fail(f"--events: {exc}")
    try:
        subscriptions.webhook_url(url)
    except ValueError as exc:
        _fail(str(exc))
    settings = load_settings()
    with _store() as store:
        try:
            added = subscriptions.add_webhook(store, url, types)
        except ValueError as exc:
            _fail(str(exc), 1)
        sink = subscriptions.embedded_sink(store, settings, added.destination.url)
    if sink is not None:
        typer.echo(f"order-saga: warning: {sink}", err=True)
    url = added.destination.url
    if as_json:
        body = {"id": added.destination.id, "url": url, "events": list(types)}
        typer.echo(json.dumps({**body, "secret": added.secret}, indent=2))
        return
    typer.echo(f"webhook {added.destination.id}: {url}")
    typer.echo(f"events: {', '.join(types)}")
    typer.echo(f"signing secret (shown once, keep it): {added.secret}")


@webhooks_app.command("list")
def list_webhooks(as_json: JsonFlag = False) -> None:
    """Every destination with its backlog (the RabbitMQ one included)."""
    from fsm import outbox, subscriptions
    from fsm.store import utcnow

    with _store() as store:
        found = subscriptions.backlog(store)
    rows: list[dict[str, Any]] = []
    now = utcnow()
    for b in found:
        lag = (now - b.oldest_pending).total_seconds() if b.oldest_pending else 0.0
        rows.append(
            {
                "id": b.destination.id,
                "kind": b.destination.kind,
                "url": b.destination.url,
                "events": outbox.subscribed(b.destination.events),
                "pending": b.pending,
                "dead": b.dead,
                "lag_seconds": round(lag, 3),
            }
        )
    if as_json:
        typer.echo(json.dumps({"destinations": rows}, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"{len(rows)} destinations", title_justify="left")
    for column in ("id", "kind", "url", "events", "pending", "dead", "lag"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            str(r["id"]),
            r["kind"],
            r["url"],
            ", ".join(r["events"]),
            str(r["pending"]),
            str(r["dead"]),
            f"{r['lag_seconds']:.1f}s",
        )
    rich_console().print(table)


@webhooks_app.command("remove")
def remove(ident: Annotated[str, typer.Argument(metavar="ID|URL|amqp")]) -> None:
    """Unsubscribe; its undelivered events are dropped (and counted). `amqp`: the RabbitMQ
    destination (a relay started with ORDER_SAGA_AMQP_URL set adds it again). To replace a
    leaked secret, `rotate` keeps the webhook and its backlog."""
    from fsm import subscriptions

    with _store() as store:
        try:
            gone = subscriptions.remove(store, ident)
        except LookupError as exc:
            _fail(str(exc).strip("'\""), 1)
    dropped = gone.pending + gone.dead
    told = f"{dropped} undelivered event{'' if dropped == 1 else 's'} dropped"
    if gone.dead:
        told += f" ({gone.dead} of them dead letters)"
    typer.echo(f"removed {gone.destination.kind} {gone.destination.id}: {gone.destination.url}")
    typer.echo(told)


@webhooks_app.command("rotate")
def rotate(
    ident: Annotated[str, typer.Argument(metavar="ID|URL")],
    overlap: Annotated[
        float,
        typer.Option(
            min=0,
            max=30 * 86400,
            help="Seconds the old secret keeps signing beside the new one (two signatures "
            "per request); 0: none, the old one stops at once.",
        ),
    ] = 86400.0,
    as_json: JsonFlag = False,
) -> None:
    """Replace a webhook's signing secret (printed once), keeping its id, its place in the
    stream and its undelivered events. During --overlap (default a day) each request is
    signed with both secrets, so the endpoint may switch to the new one at any time
    within it; relays sign with the new one within seconds. Mid-deploy, a relay of the
    previous release signs with the new secret only."""
    from fsm import subscriptions

    with _store() as store:
        try:
            done = subscriptions.rotate(store, ident, overlap=overlap)
        except LookupError as exc:
            _fail(str(exc).strip("'\""), 1)
    until = None if done.old_until is None else done.old_until.isoformat(timespec="seconds")
    if as_json:
        body = {"id": done.destination.id, "url": done.destination.url, "old_signs_until": until}
        typer.echo(json.dumps({**body, "secret": done.secret}, indent=2))
        return
    typer.echo(f"webhook {done.destination.id}: {done.destination.url}")
    typer.echo(f"new signing secret (shown once, keep it): {done.secret}")
    if until is None:
        typer.echo("the old secret signs no more")
    else:
        typer.echo(f"the old secret also signs until {until}")


@webhooks_app.command("test")
def test(ident: Annotated[str, typer.Argument(metavar="ID|URL")]) -> None:
    """Send one signed `order-saga.test` event now; exit 1 unless the endpoint took it."""
    import asyncio  # here: the other commands need none of it

    from fsm import subscriptions
    from order_saga.console import load_settings

    settings = load_settings()
    with _store() as store:
        try:
            destination = subscriptions.find(store, ident)
        except LookupError as exc:
            _fail(str(exc).strip("'\""), 1)
        try:
            attempt = asyncio.run(
                subscriptions.test_webhook(destination, timeout=settings.event_timeout)
            )
        except ValueError as exc:  # a secret that does not decode: nothing was sent
            _fail(
                f"{destination.url}: its signing secret is unreadable ({exc}); "
                f"`order-saga webhooks rotate {destination.id} --overlap 0` gives it a new one",
                1,
            )
        sink = None
        if attempt.error == "HTTP 401":
            sink = subscriptions.embedded_sink(store, settings, destination.url)
    if attempt.delivered:
        typer.echo(f"{destination.url}: delivered")
        return
    _fail(f"{destination.url}: {attempt.error}" + ("" if sink is None else f": {sink}"), 1)


@events_app.command("list")
def list_events(
    failed: Annotated[bool, typer.Option("--failed", help="Dead letters only.")] = False,
    limit: Annotated[int, typer.Option(min=1, max=100_000)] = 50,
    as_json: JsonFlag = False,
) -> None:
    """Deliveries, newest event first: event id, type, destination, state, attempts."""
    from fsm import subscriptions

    with _store() as store:
        found = subscriptions.deliveries(store, failed=failed, limit=limit)
    if as_json:
        rows = [
            {
                "event_id": r.event_id,
                "type": r.type,
                "destination": r.destination,
                "state": r.state,
                "attempts": r.attempts,
                "last_error": r.last_error,
                "time": r.created_at.isoformat(),
            }
            for r in found
        ]
        typer.echo(json.dumps({"deliveries": rows}, indent=2))
        return
    title = f"{len(found)} {'dead letters' if failed else 'deliveries'}"
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in ("event", "type", "destination", "state", "attempts", "error"):
        table.add_column(column, no_wrap=column == "event")
    for r in found:
        table.add_row(
            r.event_id, r.type, r.destination, r.state, str(r.attempts), r.last_error or ""
        )
    rich_console().print(table)


@events_app.command("redeliver")
def redeliver(
    event_id: Annotated[str | None, typer.Argument(metavar="[ID]")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every dead letter.")] = False,
) -> None:
    """Put dead letters back in line: one event (with its order's other dead events to the
    same destinations, the earliest first, so order holds), or --all."""
    from fsm import subscriptions

    if (event_id is None) == (not all_):
        _fail("give an event ID or --all (not both)")
    with _store() as store:
        try:
            revived = subscriptions.redeliver(store, None if all_ else event_id)
        except ValueError as exc:
            _fail(str(exc))
    if revived.count == 0:
        _fail(f"no dead letter {'at all' if all_ else event_id}", 1)
    typer.echo(revived.said(event_id))
