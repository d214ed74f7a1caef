"""`order-saga prune` and `order-saga archive show`: retention from a shell (issue 22).
A one-off prune with the same rules as the background pass (`fsm.retention`), and one
archived order printed exactly as `orders show` prints a live one. Decides nothing itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from order_saga.console import (
    count_option,
    database_settings,
    fail,
    parse_order_id,
    seconds_option,
)

archive_app = typer.Typer(help="Read archives written by prune.", no_args_is_help=True)


def prune(
    older_than: Annotated[
        float | None, seconds_option("Terminal orders whose last move is older (seconds).")
    ] = None,
    keep: Annotated[
        int | None, count_option("Also delete beyond the newest N terminal orders.")
    ] = None,
    archive: Annotated[
        Path | None,
        typer.Option(help="Append each order (with its log) here, fsynced, before deleting."),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count, delete nothing.")] = False,
    batch: Annotated[int, typer.Option(min=1, max=10_000, help="Orders per transaction.")] = 200,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Delete terminal orders (never running or parked ones, nor one placed with an
    Idempotency-Key less than 24 h ago) with their transitions."""
    from fsm import archive as archives
    from fsm.retention import Pruner, crash_hook, held_line
    from fsm.wiring import open_engine

    if older_than is None and keep is None:
        fail("give --older-than SECONDS and/or --keep N", 2)
    if archive is not None and archive.is_dir():
        fail(f"--archive: {archive} is a directory", 2)
    settings = database_settings()
    path = archive
    with open_engine(settings) as engine:
        pruner = Pruner(
            engine,
            older_than=older_than,
            keep_rows=keep,
            batch=batch,
            appender=(lambda: archives.Appender(path)) if path is not None else None,
            crash=crash_hook(settings.crash_after),
        )
        try:
            summary = pruner.count() if dry_run else pruner.run()
        except archives.ArchiveError as exc:
            fail(str(exc), 1)
    if as_json:
        typer.echo(json.dumps({"dry_run": dry_run, **summary.as_json()}, indent=2))
    elif dry_run:
        typer.echo(f"would delete {summary.eligible} orders")
        if summary.key_held:
            typer.echo(f"{summary.key_held} {held_line()}")
        for oid in summary.ids:
            typer.echo(f"  {oid}")
    else:
        typer.echo(summary.line())


@archive_app.command("show")
def show(
    file: Annotated[Path, typer.Argument(metavar="FILE")],
    order_id: Annotated[str, typer.Argument(metavar="ID")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """One archived order, printed as `orders show` prints a live one."""
    from fsm import archive as archives
    from order_saga.orders_cli import print_order

    oid = parse_order_id(order_id)
    if not file.is_file():
        fail(f"no archive file {file}", 1)
    try:
        found = archives.find(file, oid)
    except archives.ArchiveError as exc:
        fail(f"{file}: {exc}", 1)
    if found is None:
        fail(f"order {oid} is not in {file}", 1)
    order, history = found
    print_order(order, history, as_json=as_json)
