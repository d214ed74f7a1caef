"""What ORDER_SAGA_* settings and the commands' number flags accept: every number of
seconds finite and at most MAX_SECONDS, every count at most MAX_COUNT, JSON settings
that are JSON, a database URL every process can open and share. Anything else stops the
command at start in one line naming it (a setting: `invalid ORDER_SAGA_X`, exit 2; a
flag: a usage error, exit 2), never a traceback, a stuck order or a sweep failing
forever later. At the bounds themselves an order runs, parks, is explained and pruned."""

from __future__ import annotations

import json
import logging
import re
import typing
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from api.app import create_app
from downstream.seed import (
    MISSING_PRODUCT_ID,
    ORDINARY_USER_ID,
    SOLD_OUT_PRODUCT_ID,
    WIDGET_ID,
)
from fsm import why
from fsm.bounds import MAX_COUNT, MAX_SECONDS
from fsm.keys import create_key
from fsm.registry import SERVICES
from fsm.retention import pruner_for
from fsm.roles import Role
from fsm.settings import Settings, settings_problem, unknown_variables
from fsm.store import Store
from fsm.text import masked, storable
from fsm.wiring import open_saga, open_store
from order_saga.console import running_with
from tests.support.api import API, place
from tests.support.database import PG_SERVER
from tests.support.in_process import Run, first_in_a_process, run_cli_here
from tests.support.processes import Saga, command, run_cli
from tests.support.services import Downstream
from tests.support.serving import Served, fresh_database
from tests.support.settings import cli_settings, saga_env, saga_settings
from tests.support.waiting import wait_until

UNREACHABLE_PG = "postgresql+psycopg://postgres@127.0.0.1:1/nothing"  # fails fast, if reached
NO_DB = {"ORDER_SAGA_DATABASE_URL": UNREACHABLE_PG}
SERVICE_NAMES = [service.name for service in SERVICES]


def number_fields() -> dict[str, type]:
    """Every int or float field of Settings (None allowed or not), by name."""
    found = {}
    for name, field in Settings.model_fields.items():
        given = typing.get_args(field.annotation) or (field.annotation,)  # X | None: X, None
        kinds = {typing.get_args(k)[0] if typing.get_origin(k) is Annotated else k for k in given}
        numbers = kinds & {int, float}
        if numbers and bool not in kinds:
            found[name] = float if float in numbers else int
    return found


NUMBERS = number_fields()
TOO_BIG = {float: str(MAX_SECONDS * 10), int: str(MAX_COUNT + 1)}


def validated(**fields: Any) -> Settings:
    """Settings(**fields) (and the ORDER_SAGA_* environment): the validation itself."""
    return Settings(**fields)


def refusal(**fields: Any) -> list[str]:
    """The fields `validated(**fields)` names in its refusal ([] if it takes them)."""
    try:
        validated(**fields)
    except ValidationError as exc:
        return [str(e["loc"][0]) for e in exc.errors() if e["loc"]]
    return []


def test_the_settings_have_numbers_to_check() -> None:
    assert {"lease_seconds", "step_deadline", "retention_rows"} <= set(NUMBERS)


@pytest.mark.parametrize("name", sorted(NUMBERS))
def test_every_number_setting_is_finite_and_bounded(name: str) -> None:
    """inf, nan or a number past the bound (ORDER_SAGA_LEASE_SECONDS=inf was a traceback
    at start, ORDER_SAGA_STEP_DEADLINE=1e20 an order stuck for good) is refused, named."""
    values = [TOO_BIG[NUMBERS[name]]] + (["inf", "nan", "-inf"] if NUMBERS[name] is float else [])
    for value in values:
        assert name in refusal(**{name: value}), f"ORDER_SAGA_{name.upper()}={value} taken"


@pytest.mark.parametrize(
    ("command", "variable", "value", "run"),
    first_in_a_process(
        [
            (["serve"], "LEASE_SECONDS", "inf"),
            (["worker"], "STEP_DEADLINE", "1e20"),
            (["resume"], "HTTP_TIMEOUT", "inf"),
            (["worker"], "ORDER_DEADLINE", "1e20"),
            (["worker"], "RETENTION_SECONDS", "1e20"),
            (["worker"], "RETENTION_ROWS", "99999999999999999999"),
            (["orders", "list"], "SWEEP_OLDER_THAN", "1e20"),
            (["orders", "list"], "PARK_MAX", "1e20"),
            (["relay"], "EVENT_MAX_AGE", "1e20"),
            (["worker"], "MAX_INTERRUPTIONS", "-1"),  # 0 is "never held"; below, nothing
            (["serve"], "MAX_INTERRUPTIONS", "1001"),
        ]
    ),
)
def test_a_number_setting_past_its_bound_stops_the_command_in_one_line(
    command: list[str], variable: str, value: str, run: Run
) -> None:
    result = run(*command, **NO_DB, **{f"ORDER_SAGA_{variable}": value})
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"order-saga: invalid ORDER_SAGA_{variable}: "), result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr


SECONDS_FLAGS = [
    ["resume", "--older-than"],
    ["worker", "--older-than"],
    ["worker", "--interval"],
    ["orders", "list", "--older-than"],
    ["prune", "--dry-run", "--older-than"],
]


@pytest.mark.parametrize(
    ("args", "run"),
    first_in_a_process(
        [
            *([*flag, value] for flag in SECONDS_FLAGS for value in ("1e20", "inf", "nan")),
            ["prune", "--dry-run", "--keep", str(MAX_COUNT + 1)],
            ["orders", "list", "--product", "99999999999999999999"],
            ["orders", "list", "--user", "99999999999999999999"],
        ],
        ids=" ".join,
    ),
)
def test_a_flag_past_its_bound_is_a_usage_error(args: list[str], run: Run) -> None:
    """`resume --older-than 1e20` and the like were a traceback (`worker`'s: one every
    sweep); the unreachable database shows the flag is refused before it is asked."""
    result = run(*args, **NO_DB)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"order-saga: Invalid value for '{args[-2]}': "), result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr


def test_a_flag_at_its_bound_works(db_url: str, store: Store) -> None:
    env = saga_env(database_url=db_url)
    for i, args in enumerate(
        [
            ["resume", "--dry-run", "--older-than", str(MAX_SECONDS)],
            ["orders", "list", "--older-than", str(MAX_SECONDS)],
            ["prune", "--dry-run", "--older-than", str(MAX_SECONDS)],
            ["prune", "--dry-run", "--keep", str(MAX_COUNT)],
        ]
    ):
        run = run_cli if i == 0 else run_cli_here  # the first in a real process
        result = run(*args, **env)
        assert result.returncode == 0, f"{args}: {result.stderr}"


async def test_every_wait_at_its_bound_still_runs_parks_explains_and_prunes(
    db_url: str, services_url: str, downstream: Downstream
) -> None:
    """MAX_SECONDS itself overflows nothing an order meets: its lease, step and order
    deadlines, HTTP timeout, the park's pause, the sweep's age in its why, retention."""
    longest = dict.fromkeys(
        (
            "lease_seconds",
            "step_deadline",
            "order_deadline",
            "http_timeout",
            "backoff_max",
            "park_min",
            "park_max",
            "sweep_older_than",
            "retention_seconds",
        ),
        MAX_SECONDS,
    )
    settings = saga_settings(db_url, services_url, retention_rows=MAX_COUNT, **longest)
    async with open_saga(settings) as saga:
        done, _ = await saga.store.create_order(
            user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1
        )
        assert (await saga.executor.run(done.id)).state == "completed"

        downstream.fault("user.refund", "error", count=1000)
        parked, _ = await saga.store.create_order(
            user_id=ORDINARY_USER_ID, product_id=SOLD_OUT_PRODUCT_ID, quantity=1
        )
        assert (await saga.executor.run(parked.id)).state == "needs_attention"
        downstream.clear_faults()
        stored = saga.store.get(parked.id)
        explained = why.for_order(saga.store, stored, settings)
        assert explained is not None and explained.kind is why.Kind.PARKED
        assert explained.until >= stored.updated_at + timedelta(seconds=MAX_SECONDS)

        pruned = pruner_for(settings, saga.store.engine).run()
        assert pruned.deleted == 0  # nothing is 31 years old, nor beyond the newest 2**63-1


# -- JSON settings and the database URL --------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "variable", "value", "message", "run"),
    first_in_a_process(
        [
            (
                ["orders", "list"],
                "SERVICES",
                "notjson",
                "invalid ORDER_SAGA_SERVICES: not valid JSON",
            ),
            (["worker"], "SERVICES", "notjson", "invalid ORDER_SAGA_SERVICES: not valid JSON"),
            (["serve"], "OIDC_ROLES", '{"hunter2', "invalid ORDER_SAGA_OIDC_ROLES: not valid JSON"),
            (["resume"], "SERVICES", "[[1, 2]]", "ORDER_SAGA_SERVICES must be a JSON object"),
            (["resume"], "SERVICES", "[1]", "ORDER_SAGA_SERVICES must be a JSON object"),
            (["resume"], "SERVICES", '"hunter2"', "ORDER_SAGA_SERVICES must be a JSON object"),
            # Falsy, and were taken as "no services" (the embedded ones) for it.
            *(
                (["resume"], "SERVICES", falsy, "ORDER_SAGA_SERVICES must be a JSON object")
                for falsy in ("[]", "null", "false", "0", '""')
            ),
        ]
    ),
)
def test_a_json_setting_that_is_not_usable_stops_the_command_in_one_line(
    command: list[str], variable: str, value: str, message: str, run: Run
) -> None:
    """Was a traceback (SettingsError, or a TypeError of the URL map); the value is never
    echoed (it may hold a secret)."""
    result = run(*command, **NO_DB, **{f"ORDER_SAGA_{variable}": value})
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("order-saga: ") and message in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "hunter2" not in result.stderr


def test_a_bad_json_setting_a_command_does_not_read_is_left_alone() -> None:
    """Every command reads the log format first; a bad setting there is the command's to
    report, and `diagram` reads none (it was a SettingsError traceback)."""
    result = run_cli("diagram", ORDER_SAGA_SERVICES="notjson")
    assert result.returncode == 0, result.stderr
    assert "stateDiagram" in result.stdout


@pytest.mark.parametrize(
    ("url", "message", "run"),
    first_in_a_process(
        [
            ("sqlite://", "in memory"),
            ("sqlite:///", "in memory"),
            ("sqlite:///:memory:", "in memory"),
            ("sqlite:///file:saga?mode=memory&uri=true", "in memory"),
            ("sqlite:///file::memory:?uri=true", "in memory"),
            ("sqlite+pysqlite:///saga.db", "must be a sqlite:///<file> or postgresql+psycopg://"),
            (
                "postgresql+asyncpg://u:hunter2@127.0.0.1:5432/db",
                "names a driver order-saga does not",
            ),
            (
                "postgresql+pg8000://u:hunter2@127.0.0.1:5432/db",
                "names a driver order-saga does not",
            ),
            (
                "postgresql+psycopg2://u:hunter2@127.0.0.1:5432/db",
                "names a driver order-saga does not",
            ),
            (
                "mysql://u:hunter2@127.0.0.1/db",
                "must be a sqlite:///<file> or postgresql+psycopg://",
            ),
        ]
    ),
)
def test_a_database_url_no_process_can_share_is_refused(url: str, message: str, run: Run) -> None:
    """`sqlite://` started `serve` and failed every POST (each connection its own empty
    database); another driver was a 40-line ModuleNotFoundError."""
    assert refusal(database_url=url) == ["database_url"]
    result = run("orders", "list", ORDER_SAGA_DATABASE_URL=url)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("order-saga: invalid ORDER_SAGA_DATABASE_URL: ")
    assert message in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr
    assert "hunter2" not in result.stderr


@pytest.mark.parametrize(
    ("command", "run"),
    first_in_a_process(
        [
            ["serve"],
            ["worker"],
            ["resume"],
            ["relay"],
            ["check-upgrade"],
            ["db", "upgrade"],
            ["orders", "list"],
            ["orders", "show", "00000000-0000-0000-0000-000000000000"],
            ["prune", "--older-than", "1"],
            ["keys", "list"],
            ["events", "list"],
            ["webhooks", "list"],
        ],
        ids=" ".join,
    ),
)
def test_every_command_refuses_an_unusable_database_url_in_one_line(
    command: list[str], run: Run
) -> None:
    result = run(
        *command, ORDER_SAGA_DATABASE_URL="postgresql+asyncpg://u:hunter2@127.0.0.1:5432/db"
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("order-saga: invalid ORDER_SAGA_DATABASE_URL: "), result.stderr
    assert len(result.stderr.splitlines()) == 1 and "hunter2" not in result.stderr


def test_postgresql_without_a_driver_means_psycopg(pg_url: str, tmp_path: Path) -> None:
    """`postgresql://` (SQLAlchemy's psycopg2, not installed) is taken as psycopg's."""
    plain = pg_url.replace("postgresql+psycopg://", "postgresql://")
    assert plain != pg_url and plain.startswith(PG_SERVER.replace("+psycopg", ""))
    assert validated(database_url=plain).database_url == pg_url
    result = run_cli("orders", "list", "--json", ORDER_SAGA_DATABASE_URL=plain)
    assert result.returncode == 0, result.stderr


def test_a_sqlite_file_is_taken_as_given(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/saga.db"
    assert validated(database_url=url).database_url == url


# -- no secret in a downstream URL -------------------------------------------------------------

SECRET = "UrLSeCrEt"
SECRET_URL = f"http://svc:{SECRET}@127.0.0.1:65535"
# A URL aiohttp refuses to call (its port): its error quotes the URL whole.
SECRET_IN_ERROR_URL = f"http://svc:{SECRET}@127.0.0.1:99999"


@pytest.mark.parametrize(
    ("variable", "run"),
    first_in_a_process(["PRODUCT_URL", "USER_URL", "INVENTORY_URL", "SHIPPING_URL", "SERVICES"]),
)
def test_a_service_url_with_a_password_stops_the_command_in_one_line(
    variable: str, run: Run
) -> None:
    """Its password reached `last_error`, every attempt_failed line and API clients
    (aiohttp's error quotes the whole URL): refused at start, never quoted."""
    urls = {f"ORDER_SAGA_{s.upper()}_URL": "http://127.0.0.1:1" for s in SERVICE_NAMES}
    if variable == "SERVICES":
        env = {"ORDER_SAGA_SERVICES": json.dumps(dict.fromkeys(SERVICE_NAMES, SECRET_URL))}
        named = f"ORDER_SAGA_{SERVICE_NAMES[0].upper()}_URL"
    else:
        env, named = urls | {f"ORDER_SAGA_{variable}": SECRET_URL}, f"ORDER_SAGA_{variable}"
    result = run("orders", "list", **NO_DB, **env)
    assert result.returncode == 2, result.stderr
    assert f"{named} must not hold a user or password" in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1 and SECRET not in result.stderr


def test_a_fallback_services_url_with_a_password_stops_the_command_in_one_line() -> None:
    url = f"http://{SECRET}@127.0.0.1:8000/services"  # a token as the user: a secret too
    result = run_cli("resume", **NO_DB, ORDER_SAGA_FALLBACK_SERVICES_URL=url)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("order-saga: invalid ORDER_SAGA_FALLBACK_SERVICES_URL: ")
    assert len(result.stderr.splitlines()) == 1 and SECRET not in result.stderr


def test_a_url_password_in_a_transport_error_reaches_no_client_record_or_log(
    db_url: str, services_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The settings refuse such a URL; should one still reach a client (a Settings built
    another way), the error texts the real client path makes of it carry no secret: not
    the API's answer, not the order's `last_error` or attempts, not a log line."""
    caplog.set_level(logging.INFO)
    settings = saga_settings(db_url, services_url, **API, max_attempts=1)
    urls = dict.fromkeys(SERVICE_NAMES, SECRET_IN_ERROR_URL)
    leaky = settings.model_copy(update={"services": urls})
    with TestClient(create_app(leaky, sweep=False)) as client:
        placed = place(client)
        order = client.get(placed.headers.get("Location") or f"/orders/{placed.json()['id']}")
        history = client.get(f"{order.request.url.path}/transitions")
    assert order.status_code == 200, order.text
    assert order.json()["last_error"], order.text  # the transport's error, told
    assert "InvalidUrlClientError: http://***@127.0.0.1:99999/" in order.json()["last_error"]
    for text in (placed.text, order.text, history.text, caplog.text):
        assert SECRET not in text
    with open_store(settings) as store:
        stored = store.get(uuid.UUID(order.json()["id"]))
    assert stored.last_error is not None and SECRET not in stored.last_error


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        (f"GET /p: E: http://svc:{SECRET}@h:1/p", "GET /p: E: http://***@h:1/p"),
        (f"E: URL('https://{SECRET}@h/x')", "E: URL('https://***@h/x')"),  # a token as user
        (f"E: http://svc:pa@{SECRET}@h/x", "E: http://***@h/x"),  # an unescaped @ in it
        ("E: http://h/a@b?c=d@e", "E: http://h/a@b?c=d@e"),  # no userinfo: as it was
        # a URL quoted in JSON ends at its quote: the text after it is not "userinfo"
        ('{"url":"http://svc:8100","contact":"ops@example.com"}',) * 2,
        ("E: <http://h:1> or mail ops@example.com",) * 2,
        (f"{'x' * 489} http://svc:{SECRET}@h/", f"{'x' * 489} http://***…"),  # masked, then cut
    ],
)
def test_an_error_text_never_quotes_a_url_s_credentials(text: str, kept: str) -> None:
    assert storable(text) == kept


# -- URLs parsed, not matched on a prefix ------------------------------------------------------

NOT_CALLABLE = [
    "http://",  # was taken, stored as `http:`
    "http:///services",
    "http://:8100",
    "http://127.0.0.1:99999",
    "http://127.0.0.1:0",
    "http://127.0.0.1:port",
    "http://exa mple.com",
    "http://[::1",
    "http://[not-an-address]:8100",
    "http://999.1.1.1",
    "http://-svc-",
    "http://svc/#fragment",
    "http://svc/?query=1",
    "http:/svc",
    "ftp://svc",
]
CALLABLE = [
    "http://127.0.0.1:8000/services",
    "https://payments.internal.example",
    "http://[::1]:8100",
    "http://inventory_service:8100",  # a compose service name
    "http://localhost",
    "https://bücher.example/api/",
]


def problem(**fields: Any) -> str | None:
    """The one line a command prints for `validated(**fields)` (None: taken)."""
    try:
        validated(**fields)
    except ValidationError as exc:
        return settings_problem(exc)
    return None


@pytest.mark.parametrize("url", NOT_CALLABLE)
def test_a_service_url_no_client_can_call_is_refused_naming_it(url: str) -> None:
    urls = {f"{name}_url": "http://127.0.0.1:8100" for name in SERVICE_NAMES}
    said = problem(**(urls | {"user_url": url}))
    assert said is not None and "ORDER_SAGA_USER_URL " in said, f"{url}: {said}"
    assert url not in said
    fallback = problem(fallback_services_url=url)
    assert fallback is not None, url
    assert fallback.startswith("invalid ORDER_SAGA_FALLBACK_SERVICES_URL: "), fallback


@pytest.mark.parametrize("url", CALLABLE)
def test_a_service_url_a_client_can_call_is_taken(url: str) -> None:
    settings = validated(**{f"{name}_url": url for name in SERVICE_NAMES})
    assert set(settings.services.values()) == {url.rstrip("/")}
    assert validated(fallback_services_url=url).fallback_services_url == url.rstrip("/")


@pytest.mark.parametrize(
    "url",
    [
        "https://",
        "https://:443",
        "https://login.example.com:0",
        "https://login.example.com/realms/shop?x=1",
        "https://login.example.com/realms/shop#top",
        f"https://client:{SECRET}@login.example.com",
        "http://login.example.com/realms/shop",  # plain http off this machine
        "login.example.com",
    ],
)
def test_an_issuer_openid_connect_would_not_take_is_refused(url: str) -> None:
    assert refusal(oidc_issuer=url, oidc_client_id="order-saga") == ["oidc_issuer"], url


@pytest.mark.parametrize(
    "url",
    ["https://login.example.com/realms/shop/", "http://127.0.0.1:9000", "http://localhost:1/x"],
)
def test_an_https_or_local_issuer_is_taken(url: str) -> None:
    taken = validated(oidc_issuer=url, oidc_client_id="order-saga")
    assert taken.oidc_issuer == url.rstrip("/")


@pytest.mark.parametrize(
    ("command", "variable", "value", "run"),
    first_in_a_process(
        [
            (["serve", "--port", "1"], "OIDC_ISSUER", "https://"),
            (["serve", "--port", "1"], "PRODUCT_URL", "http://"),
            (["worker"], "FALLBACK_SERVICES_URL", "http://127.0.0.1:99999"),
            (["resume"], "SHIPPING_URL", "http://[::1"),
        ]
    ),
)
def test_a_malformed_url_stops_the_command_in_one_line(
    command: list[str], variable: str, value: str, run: Run
) -> None:
    urls = {f"ORDER_SAGA_{s.upper()}_URL": "http://127.0.0.1:1" for s in SERVICE_NAMES}
    env = urls if variable.endswith("_URL") and variable != "FALLBACK_SERVICES_URL" else {}
    result = run(*command, **NO_DB, **(env | {f"ORDER_SAGA_{variable}": value}))
    assert result.returncode == 2, result.stderr
    assert f"ORDER_SAGA_{variable}" in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr


# -- settings that contradict each other, empty values that meant something else ------------


@pytest.mark.parametrize(
    ("first", "bound", "run"),
    first_in_a_process(
        [
            ("PARK_MIN", "PARK_MAX"),
            ("BACKOFF_BASE", "BACKOFF_MAX"),
            ("EVENT_BACKOFF_BASE", "EVENT_BACKOFF_MAX"),
        ]
    ),
)
def test_a_pause_that_starts_above_its_bound_stops_the_command_in_one_line(
    first: str, bound: str, run: Run
) -> None:
    """PARK_MIN=7200 with PARK_MAX=600 was taken, and PARK_MIN silently did nothing (the
    pause is cut to its bound)."""
    result = run(
        "orders", "list", **NO_DB, **{f"ORDER_SAGA_{first}": "7200", f"ORDER_SAGA_{bound}": "600"}
    )
    assert result.returncode == 2, result.stderr
    said = result.stderr
    assert said.startswith("order-saga: invalid settings: ") and len(said.splitlines()) == 1, said
    assert f"ORDER_SAGA_{first} (7200) must not be above ORDER_SAGA_{bound} (600)" in said
    assert validated(**{first.lower(): 600, bound.lower(): 600})  # equal: a constant pause


@pytest.mark.parametrize("variable", ["SERVICES_DB", "OIDC_CLIENT_ID"])
@pytest.mark.parametrize("value", ["", " "])
def test_an_empty_value_that_meant_something_else_is_refused(variable: str, value: str) -> None:
    """SERVICES_DB= kept the embedded services' state in memory (lost at each restart, one
    per `serve --workers N` process); OIDC_CLIENT_ID= turned single sign-on off without a
    word."""
    assert refusal(**{variable.lower(): value}) == [variable.lower()]
    # One case in a real process (the console script), the others in this one.
    run = run_cli if (variable, value) == ("SERVICES_DB", "") else run_cli_here
    result = run("orders", "list", **NO_DB, **{f"ORDER_SAGA_{variable}": value})
    assert result.returncode == 2, result.stderr
    said = result.stderr
    assert said.startswith(f"order-saga: invalid ORDER_SAGA_{variable}: "), said
    assert "must not be empty" in said, said
    assert len(result.stderr.splitlines()) == 1, result.stderr


# -- what a process runs with: unknown variables told, one line at start ------------------------


def test_a_misspelt_variable_is_a_warning_naming_it_and_the_setting_never_its_value(
    db_url: str,
) -> None:
    """ORDER_SAGA_API_TOKENS ran the API open and ORDER_SAGA_DATABSE_URL the default
    database, without a word."""
    env = saga_env(database_url=db_url) | {
        "ORDER_SAGA_API_TOKENS": "hunter2",
        "ORDER_SAGA_DATABSE_URL": "sqlite:///hunter2.db",
        "order_saga_relay_nicee": "hunter2",  # read in any case, as the settings are
    }
    result = run_cli("orders", "list", "--json", **env)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 3 and "hunter2" not in result.stderr, result.stderr
    for given, meant in [
        ("ORDER_SAGA_API_TOKENS", "ORDER_SAGA_API_TOKEN"),
        ("ORDER_SAGA_DATABSE_URL", "ORDER_SAGA_DATABASE_URL"),
        ("order_saga_relay_nicee", "ORDER_SAGA_RELAY_NICE"),
    ]:
        assert any(
            "WARNING" in line and f"{given} is not an order-saga setting" in line and meant in line
            for line in lines
        ), (given, result.stderr)


def test_every_variable_order_saga_reads_is_known() -> None:
    """No warning for what is read, though not a field: a service's URL, the steps plugged
    in, the tests' and benchmarks' own variables (every name the repository spells but
    this file's misspellings), in any case."""
    root = Path(__file__).resolve().parent.parent
    spelt = {
        name
        for path in [root / "README.md", *root.glob("*/**/*.py"), *root.glob("scripts/*")]
        if path.is_file() and path.name != Path(__file__).name and ".venv" not in path.parts
        for name in re.findall(r"\bORDER_SAGA_[A-Z0-9_]*[A-Z0-9]\b", path.read_text())
    }
    assert {"ORDER_SAGA_TEST_PG", "ORDER_SAGA_STEP_MODULES", "ORDER_SAGA_USER_URL"} <= spelt
    read = spelt | {f"ORDER_SAGA_{s.upper()}_URL" for s in SERVICE_NAMES} | {"order_saga_relay"}
    assert unknown_variables(dict.fromkeys(read, "1") | {"PATH": "/usr/bin"}) == []


def test_serve_says_in_one_line_what_it_runs_with(tmp_path: Path) -> None:
    with fresh_database("sqlite", str(tmp_path)) as url:
        env = saga_env(
            database_url=url, api_token="hunter2", relay=False, services_db=str(tmp_path / "s.db")
        )
        output = Served(env).wait_ready().stop()
    said = [line for line in output.splitlines() if "order_saga.start" in line]
    assert len(said) == 1 and " INFO " in said[0], output
    assert said[0].endswith(
        f"running with database {url}; authentication on (API_TOKEN); services embedded, "
        "under /services; relay off (ORDER_SAGA_RELAY=false)"
    ), said
    assert "hunter2" not in output


async def test_a_worker_says_in_one_line_what_it_runs_with(
    db_url: str, store: Store, services_url: str
) -> None:
    create_key(engine=store.engine, name="ci", role=Role.CLIENT)
    order, _ = await store.create_order(
        user_id=ORDINARY_USER_ID, product_id=MISSING_PRODUCT_ID, quantity=1
    )
    env = saga_env(
        database_url=db_url, services_url=services_url, worker_metrics_port=0, relay=False
    )
    with Saga(command("worker", "--interval", "0.1", "--older-than", "0"), env) as worker:
        wait_until(  # its sweep starts once the line is logged
            lambda: store.get(order.id).status == "rejected",
            what="the worker to drive the order",
            alive=worker.running,
        )
        output = worker.stop().stderr
    said = [line for line in output.splitlines() if "order_saga.start" in line]
    assert len(said) == 1, output
    urls = ", ".join(f"{name} {services_url}" for name in SERVICE_NAMES)
    assert said[0].endswith(
        f"running with database {masked(db_url)}; authentication on (keys); services "
        f"external: {urls}; relay off (ORDER_SAGA_RELAY=false)"
    ), said


def test_the_start_line_masks_the_database_password_and_names_external_services() -> None:
    settings = cli_settings(
        "postgresql+psycopg://app:hunter2@db.internal:5432/saga",
        "http://services.internal:8100",
        oidc_issuer="https://login.example.com",
        oidc_client_id="order-saga",
    )
    line = running_with(settings, keys=False, embedded="(unused)")
    assert "hunter2" not in line and "//***@db.internal:5432/saga" in line, line
    assert "authentication on (OpenID Connect https://login.example.com)" in line, line
    bare = running_with(cli_settings("sqlite:///saga.db"), keys=False, embedded="embedded")
    assert "authentication OFF (no API_TOKEN, no OIDC, no key" in bare, bare
    assert "services embedded; relay on" in bare, bare
    urls = ", ".join(f"{name} http://services.internal:8100" for name in SERVICE_NAMES)
    assert f"services external: {urls}; relay on" in line, line
