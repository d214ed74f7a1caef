"""`order-saga keys create|list|revoke`: client keys with roles (issue 17), managed from a
shell on a host that reaches the orders database (that access is the admin's credential).

`create` prints the secret once, on stdout alone (so `$(order-saga keys create ...)`
captures it) and never again; `list` shows names, roles and dates, never a secret or a
hash. The schema must be there (`order-saga db upgrade`, or any `serve` once).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated

import typer

from fsm.roles import Role
from order_saga.console import database_settings, one_line
from order_saga.console import fail as _fail

if TYPE_CHECKING:
    from sqlalchemy import Engine

keys_app = typer.Typer(help="Client keys with roles (API and console access).")


@contextmanager
def _engine() -> Iterator[Engine]:
    """The read pool (`fsm.wiring.open_engine`: the settings' lock and statement timeouts);
    a database error in the command ends in one line."""
    from sqlalchemy.exc import SQLAlchemyError

    from fsm.text import masked
    from fsm.wiring import open_engine

    settings = database_settings()
    with open_engine(settings) as engine:
        try:
            yield engine
        except SQLAlchemyError as exc:  # unreachable, or no schema yet
            _fail(
                f"{masked(settings.database_url)}: {one_line(exc)} "
                "(is the schema there? `order-saga db upgrade`)",
                1,
            )


@keys_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="Who holds it, e.g. checkout-service or alice.")],
    role: Annotated[Role, typer.Option(help="What it may do.", case_sensitive=False)],
) -> None:
    """Create a key and print its secret, once: store it now, it cannot be shown again."""
    from fsm import keys

    with _engine() as engine:
        try:
            secret = keys.create_key(engine=engine, name=name, role=role)
        except keys.KeyError_ as exc:
            _fail(str(exc))
    typer.echo(secret)
    typer.echo(
        f"key {name!r} ({role.value}) created; the secret above is shown this once", err=True
    )


@keys_app.command("list")
def list_keys(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Names, roles, created, last used, revoked: never a secret."""
    from fsm import keys

    with _engine() as engine:
        found = keys.list_keys(engine=engine)
    rows = [
        {
            "name": k.name,
            "role": k.role.value,
            "created_at": k.created_at.isoformat(),
            "last_used_at": k.last_used_at.isoformat() if k.last_used_at else None,
            "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None,
        }
        for k in found
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("no keys (authentication is off unless ORDER_SAGA_API_TOKEN is set)")
        return
    for r in rows:
        state = f"revoked {r['revoked_at']}" if r["revoked_at"] else "live"
        used = r["last_used_at"] or "never"
        typer.echo(
            f"{r['name']:<24} {r['role']:<9} created {r['created_at']}  used {used}  {state}"
        )


@keys_app.command("revoke")
def revoke(name: Annotated[str, typer.Argument(help="The key's name.")]) -> None:
    """Revoke a key: every `serve` stops accepting it within 5 seconds."""
    from fsm import keys

    with _engine() as engine:
        try:
            keys.revoke_key(engine=engine, name=name)
        except keys.KeyError_ as exc:
            _fail(str(exc), 1)
    typer.echo(f"key {name!r} revoked")
