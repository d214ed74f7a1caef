"""What every `order-saga` command shares: settings read once with one-line errors, the
one-line failure (secrets masked), `--version`. Both command modules (`cli`, `orders_cli`)
import this one and never each other. No engine here: commands get theirs from
`fsm.wiring`. Kept light, so `order-saga --help` stays fast.
"""

from __future__ import annotations

import logging
import sys
import uuid
from functools import cache
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from fsm.bounds import MAX_COUNT, MAX_SECONDS
from fsm.text import masked

if TYPE_CHECKING:  # imported by the commands that read settings: `--help` needs neither
    from rich.console import Console

    from fsm.settings import Settings


def environment_errors() -> tuple[type[BaseException], ...]:
    """Failures of the environment, not of the program: reported in one line, exit 1.
    A function, so the CLI's start-up imports none of their libraries: only a command
    that talks to a database or a service does (or a handler that catches one)."""
    import sqlite3

    import httpx
    import psycopg  # a raw connection of the pool raises its own (fsm.subscriptions.read)
    from sqlalchemy.exc import SQLAlchemyError

    from fsm.clock import ClockSkew
    from fsm.errors import StoreUnavailable

    return (
        ClockSkew,  # this host's clock: sync it
        SQLAlchemyError,
        OSError,
        sqlite3.Error,
        psycopg.Error,
        httpx.HTTPError,
        StoreUnavailable,
    )


@cache
def rich_console() -> Console:
    """rich, for the tables and lines people read (imported then: `--json` and the other
    commands need none of it). Plain text only: what it prints holds URLs, reasons and
    errors from the database, and rich's markup (`[red]`, `[/b]`) and emoji codes (`:x:`)
    would restyle, swallow or refuse them (a MarkupError). Style with `rich.text.Text`.
    A pipe or a file gets wide lines (rich would squeeze the table into 80 columns)."""
    from rich.console import Console

    return Console(
        markup=False,
        emoji=False,
        highlight=False,
        width=None if sys.stdout.isatty() else 240,
    )


def fail(message: str, code: int = 2) -> NoReturn:
    """`order-saga: <message>` on stderr (URLs' credentials masked), exit `code`."""
    typer.echo(f"order-saga: {masked(message)}", err=True)
    raise typer.Exit(code)


# How long `worker` or `resume` waits for the fallback services to accept a connection.
FALLBACK_CONNECT = 3.0


def require_services(settings: Settings) -> None:
    """`worker` and `resume` host no services: with no service URL set they call the
    embedded ones of a `serve` at FALLBACK_SERVICES_URL. Nothing accepting connections
    there, they stop here (exit 2, a setting to give) instead of driving real orders into
    failed calls and parking charged ones as refund-pending. A connection is all it tries
    (a few seconds at most): what answers is the calls' business."""
    import socket
    from urllib.parse import urlsplit

    if settings.services:
        return
    url = settings.fallback_services_url
    where = urlsplit(url)
    port = where.port or (443 if where.scheme == "https" else 80)
    try:
        socket.create_connection((where.hostname or "", port), timeout=FALLBACK_CONNECT).close()
    except OSError as exc:
        fail(
            "no service URLs are set (ORDER_SAGA_SERVICES, or ORDER_SAGA_<SERVICE>_URL for "
            "each service) and nothing answers at ORDER_SAGA_FALLBACK_SERVICES_URL "
            f"{url} (a `serve` with its embedded services): {one_line(exc)}",
            2,
        )


def one_line(exc: BaseException) -> str:
    """`Type: first line of the message`."""
    from fsm.sql import first_line

    return f"{type(exc).__name__}: {first_line(exc)}".rstrip(": ")


def load_settings() -> Settings:
    """The ORDER_SAGA_* settings, or one line naming the first bad one (exit 2). Neither
    line quotes the value: it may be a password, a token or a client secret. An
    ORDER_SAGA_* variable no setting reads (a typo) is a warning naming it, once."""
    import os

    from fsm.settings import SETTINGS_ERRORS, Settings, settings_problem, unknown_variables

    try:
        settings = Settings()
    except SETTINGS_ERRORS as exc:
        fail(settings_problem(exc))
    if not _warned:
        _warned.append(True)
        for line in unknown_variables(os.environ):
            logging.getLogger("order_saga.settings").warning("%s", line)
    return settings


_warned: list[bool] = []  # the unknown variables were told (once a process)


def running_with(settings: Settings, *, keys: bool, embedded: str) -> str:
    """What `serve` or `worker` runs with, in one log line: the database (its URL's
    userinfo masked), whether the API asks for credentials and which (`keys`: any in the
    database), where the services are (`embedded`: the caller's words for no URL set),
    whether it runs a relay. No secret (a service URL holds none: the settings refuse)."""

    # As api.auth enforces it: a token, OpenID Connect sign-in, or any key.
    credentials = [
        *(["API_TOKEN"] if settings.api_token else []),
        *([f"OpenID Connect {settings.oidc_issuer}"] if settings.oidc else []),
        *(["keys"] if keys else []),
    ]
    auth = (
        f"on ({', '.join(credentials)})"
        if credentials
        else "OFF (no API_TOKEN, no OIDC, no key: every route is open until a key is created)"
    )
    services = (
        "external: " + ", ".join(f"{name} {url}" for name, url in settings.services.items())
        if settings.services
        else embedded
    )
    relay = "on" if settings.relay else "off (ORDER_SAGA_RELAY=false)"
    return (
        f"running with database {masked(settings.database_url)}; authentication {auth}; "
        f"services {services}; relay {relay}"
    )


def database_settings() -> Settings:
    """`load_settings()` for a command that uses the orders database without migrating it
    (all but `serve`, `worker` and `db upgrade`): a database that is not there (a SQLite
    file is then not created) or has no schema ends in one line, exit 1, naming where it
    looked (a file's absolute path, a URL with its credentials masked) and what to do."""
    from fsm import presence

    settings = load_settings()
    url = settings.database_url
    what = presence.missing(settings)
    if what is not None:
        path = presence.sqlite_path(url)
        where = str(path) if path is not None else masked(url)
        fail(
            f"no order-saga database at {where} ({what}): create it with "
            "`order-saga db upgrade`, or point ORDER_SAGA_DATABASE_URL at yours",
            1,
        )
    return settings


def seconds_option(help: str | None = None, *, min: float = 0) -> Any:
    """A flag taking seconds: a number from `min` to MAX_SECONDS (about 31 years), as the
    ORDER_SAGA_* settings take them; anything else (inf, nan: no comparison with it holds)
    a usage error, exit 2, before it could overflow a date or a timeout."""
    return typer.Option(min=min, max=MAX_SECONDS, help=help)


def count_option(help: str | None = None, *, min: int = 0) -> Any:
    """A flag taking a number of rows, at most what SQL's LIMIT/OFFSET takes."""
    return typer.Option(min=min, max=MAX_COUNT, help=help)


def parse_order_id(text: str, what: str = "") -> uuid.UUID:
    """`text` as an order id, or a one-line error (exit 2) naming the flag `what`."""
    try:
        return uuid.UUID(text)
    except ValueError:
        fail(f"{what}{text!r} is not an order id (UUID)")


def _print_version(value: bool) -> None:
    if value:
        from order_saga import __version__

        typer.echo(f"order-saga {__version__}")
        raise typer.Exit()


def version_option(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Durable order orchestrator."""
    # Every command logs in ORDER_SAGA_LOG_FORMAT, warnings and up (serve, worker and
    # resume set their own level). A bad setting is left to the command to report; the
    # others are the command's to read (LogFormatSetting: why not Settings() here).
    from fsm.settings import SETTINGS_ERRORS, LogFormatSetting
    from order_saga.logs import configure

    try:
        configure(LogFormatSetting().log_format, logging.WARNING)
    except SETTINGS_ERRORS:
        pass
