"""`order-saga orders list|show|cancel|resolve`: the operator's view and actions from a
shell, like `temporal workflow list/describe` or `dbos workflow list/get/cancel`. A table
for people by default, `--json` for scripts (the same shapes as the HTTP API). The
store and the engine come from `fsm.wiring`, the shared helpers from `order_saga.console`.
"""

from __future__ import annotations

import getpass
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any

import typer

from fsm.bounds import MAX_ID
from fsm.errors import SagaError
from fsm.machine import OperatorAction, OrderState, Status
from order_saga.console import (
    database_settings,
    fail,
    load_settings,
    parse_order_id,
    require_services,
    rich_console,
    seconds_option,
)

if TYPE_CHECKING:
    import uuid

    from rich.table import Table

    from fsm.models import Order, Transition
    from fsm.operator import Audit
    from fsm.queries import Attempt, Page, Unreadable
    from fsm.store import Store
    from fsm.why import Why

orders_app = typer.Typer(help="List, inspect, cancel and resolve orders.", no_args_is_help=True)
JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
AsName = Annotated[
    str | None,
    typer.Option("--as", help="Who is acting, for the audit row (default: the local admin)."),
]
LOCAL_ADMIN = "local-admin"
PARKED_SHOWN = 20  # above the first page; the rest with --status needs_attention


@contextmanager
def _store() -> Iterator[Store]:
    """The store alone (`fsm.wiring.open_store`), closed on the way out."""
    from fsm.wiring import open_store

    with open_store(database_settings()) as store:
        yield store


def _as_json(order: Order, why: Why | None = None) -> dict[str, Any]:
    from api.schemas import OrderOut

    body: dict[str, Any] = OrderOut.of(order, why).model_dump(mode="json")
    body["next_attempt_at"] = order.next_attempt_at.isoformat() if order.next_attempt_at else None
    return body


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2))


def _ago(order: Order) -> str:
    from fsm.heatmap import duration
    from fsm.queries import age

    return duration(age(order.updated_at))


@orders_app.command("list")
def list_orders(
    status: Annotated[Status | None, typer.Option(help="Coarse status.")] = None,
    state: Annotated[OrderState | None, typer.Option(help="Exact machine state.")] = None,
    older_than: Annotated[
        float | None, seconds_option("Unmoved for at least this many seconds.")
    ] = None,
    product: Annotated[int | None, typer.Option(min=1, max=MAX_ID)] = None,
    user: Annotated[int | None, typer.Option(min=1, max=MAX_ID)] = None,
    id_prefix: Annotated[
        str | None, typer.Option("--id", help="A full order id or its first characters.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 50,
    cursor: Annotated[
        str | None, typer.Option(help="The next-page cursor printed by the previous page.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Orders, newest first, each live one with why it stands still; a row the installed
    machine cannot read is listed as such. Pages with --cursor, by when an order was
    created (never changes: no order skipped or shown twice while orders move). The first
    page shows the parked (needs_attention) orders above, apart (at most PARKED_SHOWN);
    they are in the pages too, in their place."""
    from dataclasses import replace

    from fsm import why
    from fsm.queries import BadCursor, BadIdPrefix, OrderFilter, list_orders

    flt = OrderFilter(
        status=status,
        state=state,
        older_than=older_than,
        product_id=product,
        user_id=user,
        id_prefix=id_prefix,
        limit=limit,
        cursor=cursor,
    )
    # A status asked for is the list itself (needs_attention) or excludes them.
    parked_flt = (
        None
        if cursor or status
        else replace(flt, status=Status.NEEDS_ATTENTION.value, limit=PARKED_SHOWN)
    )
    try:
        with _store() as store:
            page = list_orders(store, flt)
            parked = list_orders(store, parked_flt) if parked_flt else None
            shown = page.orders + (parked.orders if parked else [])
            whys = why.for_orders(store, shown, load_settings())
    except (BadCursor, BadIdPrefix) as exc:
        fail(str(exc), 2)
    if as_json:

        def listing(found: Page) -> dict[str, Any]:
            return {
                "orders": [_as_json(o, whys.get(o.id)) for o in found.orders],
                "unreadable": [_unreadable_json(u) for u in found.unreadable],
                "total": found.total,
            }

        body = listing(page) | {"next_cursor": page.next_cursor}
        _print_json(body | {"parked": listing(parked) if parked else None})
        return
    if parked and parked.total:
        more = parked.total - len(parked.items)
        title = f"parked: {parked.total}" + (
            f" (the first {len(parked.items)}; all: --status needs_attention)" if more else ""
        )
        rich_console().print(_table(title, parked, whys))
    rich_console().print(
        _table(f"{len(page.items)} of {page.total} orders, newest first", page, whys)
    )
    if page.next_cursor:
        rich_console().print(f"next page: --cursor {page.next_cursor}")


def _table(title: str, page: Page, whys: dict[uuid.UUID, Why]) -> Table:
    from rich.table import Table

    from fsm.queries import Unreadable

    table = Table(title=title, title_justify="left")
    for column in ("id", "status", "state", "user", "product", "qty", "amount", "moved", "why"):
        table.add_column(column, no_wrap=column in ("id", "state"))
    for o in page.items:
        if isinstance(o, Unreadable):
            table.add_row(str(o.id), "UNREADABLE", o.state, "", "", "", "", "", o.why)
            continue
        w = whys.get(o.id)
        because = w.summary if w is not None else ""
        table.add_row(
            str(o.id),
            o.status,
            o.state,
            str(o.user_id),
            str(o.product_id),
            str(o.quantity),
            "" if o.amount is None else f"{o.amount / 100:.2f}",
            f"{_ago(o)} ago",
            because,
        )
    return table


def _unreadable_json(row: Unreadable) -> dict[str, Any]:
    from api.schemas import UnreadableOut

    body: dict[str, Any] = UnreadableOut.of(row).model_dump(mode="json")
    return body


@orders_app.command("show")
def show(order_id: Annotated[str, typer.Argument(metavar="ID")], as_json: JsonFlag = False) -> None:
    """One order: amount, steps, why it is parked, and its timeline (time in each state)."""
    from fsm import why
    from fsm.queries import attempts

    oid = parse_order_id(order_id)
    settings = load_settings()
    try:
        with _store() as store:
            order = store.get(oid)
            history = store.history(oid)
            tried = attempts(store, oid)
            because = why.for_order(store, order, settings)
    except SagaError as exc:
        fail(str(exc), 1)
    print_order(order, history, as_json=as_json, tried=tried, because=because)


def print_order(
    order: Order,
    history: list[Transition],
    *,
    as_json: bool,
    tried: Sequence[Attempt] = (),
    because: Why | None = None,
) -> None:
    """`orders show`'s output for an order and its log (also `archive show`'s); with
    its failed attempts and why it stands where it is when the order is live."""
    from fsm.heatmap import duration
    from fsm.queries import timeline

    spans = timeline(history)
    if as_json:
        body = _as_json(order, because)
        body["failed_attempts"] = [
            {
                "at": a.at.isoformat(),
                "call": a.call,
                "attempt": a.attempt,
                "error": a.error,
                "next_attempt_at": a.next_attempt_at.isoformat() if a.next_attempt_at else None,
                "waiting_on": a.waiting_on,
            }
            for a in tried
        ]
        body["timeline"] = [
            {
                "seq": s.seq,
                "scope": s.scope,
                "trigger": s.trigger,
                "from_state": s.from_state,
                "to_state": s.to_state,
                "at": s.at.isoformat(),
                "seconds": s.seconds,
                "detail": s.detail,
            }
            for s in spans
        ]
        _print_json(body)
        return
    amount = "–" if order.amount is None else f"{order.amount / 100:.2f}"
    from rich.text import Text

    out = rich_console()
    out.print(Text.assemble((str(order.id), "bold"), f"  {order.status} ({order.state})"))
    out.print(
        f"user {order.user_id} · product {order.product_id} × {order.quantity} · amount {amount}"
    )
    out.print(
        "steps: " + ", ".join(f"{step} {state}" for step, state in order.step_states().items())
    )
    if order.state == OrderState.NEEDS_ATTENTION and order.attention_reason:
        out.print(Text.assemble(("needs attention:", "bold red"), f" {order.attention_reason}"))
    if because is not None:
        out.print(Text.assemble(("why it is here:", "bold"), f" {because.summary}"))
    if order.last_error:
        out.print(f"last error: {order.last_error}")
    from rich.table import Table

    table = Table(title="timeline", title_justify="left")
    for column in ("seq", "at", "scope", "trigger", "from → to", "stayed", "detail"):
        table.add_column(column)
    rows: list[tuple[Any, tuple[str, ...]]] = []
    for s in spans:
        stayed = duration(s.seconds) if s.seconds is not None else "now"
        detail = json.dumps(s.detail) if s.detail else ""
        at = f"{s.at:%H:%M:%S.%f}"[:-3]
        line = (str(s.seq), at, s.scope, s.trigger, f"{s.from_state} → {s.to_state}", stayed)
        rows.append((s.at, (*line, detail[:80])))
    for a in tried:  # failed attempts and breaker waits: not transitions, between them
        what = (
            f"waits for {a.waiting_on} breaker" if a.waiting_on else f"attempt {a.attempt} failed"
        )
        at = f"{a.at:%H:%M:%S.%f}"[:-3]
        rows.append((a.at, ("", at, a.call.split(":")[0], a.call, what, "", (a.error or "")[:80])))
    for _, row in sorted(rows, key=lambda r: r[0]):
        table.add_row(*row)
    out.print(table)


def cli_audit(action: OperatorAction, as_name: str | None, reason: str | None) -> Audit:
    """The CLI acts as the local admin (whoever can reach the database is one); `--as`
    names the person, recorded with the login name of the shell that ran it."""
    from fsm.operator import Audit

    who = {"by": (as_name or "").strip() or LOCAL_ADMIN, "as": "admin", "via": "cli"}
    login = _who()
    if login:
        who["login"] = login
    return Audit(action, who, reason, channel="cli")


@orders_app.command("cancel")
def cancel(
    order_id: Annotated[str, typer.Argument(metavar="ID")],
    as_json: JsonFlag = False,
    as_name: AsName = None,
    reason: Annotated[str | None, typer.Option(help="Why (kept in the log).")] = None,
) -> None:
    """Cancel a completed order: refund, restore stock, cancel the shipment."""
    import asyncio  # here: the other commands need none of it

    from fsm.wiring import open_saga

    oid = parse_order_id(order_id)
    settings = database_settings()

    async def main() -> Order:
        async with open_saga(settings) as saga:
            # Refunds, restores and cancels need the services: with none to call, the
            # cancellation would be committed and left waiting on failed calls. An order
            # that cannot be cancelled is refused for that, as before, whatever the services.
            found = await asyncio.to_thread(saga.store.get, oid)  # the read pool, off the loop
            if found.state == OrderState.COMPLETED or found.cancel_requested:
                await asyncio.to_thread(require_services, settings)
            audit = cli_audit(OperatorAction.CANCEL, as_name, reason)
            return await saga.executor.cancel(oid, audit=audit)

    try:
        order = asyncio.run(main())
    except SagaError as exc:
        fail(str(exc), 1)
    if as_json:
        _print_json(_as_json(order))
    else:
        typer.echo(f"{order.id} {order.state} ({order.status})")
    if order.status != Status.CANCELLED:
        fail(f"not cancelled yet: {order.attention_reason or order.state}", 3)


def _who() -> str | None:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name in a bare container
        return None


@orders_app.command("resolve")
def resolve(
    order_id: Annotated[str, typer.Argument(metavar="ID")],
    reason: Annotated[str, typer.Option(help="What was fixed by hand (kept in the log).")],
    as_json: JsonFlag = False,
    as_name: AsName = None,
) -> None:
    """End a parked (needs_attention) order an operator fixed by hand: -> resolved. An
    order resolved already is printed as it is, exit 0 (nothing written)."""
    import asyncio

    from fsm import operator
    from fsm.executor import new_owner

    if not reason.strip():
        fail("--reason must not be empty", 2)
    settings = load_settings()
    oid = parse_order_id(order_id)
    try:
        with _store() as store:
            resolved = asyncio.run(
                operator.resolve(
                    store,
                    oid,
                    reason=reason,
                    owner=new_owner(),
                    operator=(as_name or "").strip() or _who(),
                    crash_after=settings.crash_after,
                    audit=cli_audit(OperatorAction.RESOLVE, as_name, reason),
                )
            )
    except SagaError as exc:
        fail(str(exc), 1)
    order = resolved.order
    if as_json:
        _print_json(_as_json(order))
    else:
        typer.echo(f"{order.id} {order.state} ({order.status})")
    if resolved.already:  # as cancelling a cancelled order: the order as it is, exit 0
        typer.echo(f"order-saga: order {order.id} was already resolved; nothing changed", err=True)
