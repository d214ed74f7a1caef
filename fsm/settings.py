"""Configuration: one Settings class read from ORDER_SAGA_* environment variables.

`get_settings()` is cached; tests and the CLI build their own `Settings(...)` and pass it
down instead of mutating the environment.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from fsm.bounds import MAX_COUNT, MAX_SECONDS
from fsm.registry import SERVICES
from fsm.urls import http_base_url, issuer_url, valid_port

# A number of seconds (a wait, an age, a lifetime): finite and at most MAX_SECONDS, above
# the lower bound its field states. A field bounded tighter states its own `le` on a plain
# float instead (as db_lock_timeout does): this one would replace it.
Seconds = Annotated[float, Field(allow_inf_nan=False, le=MAX_SECONDS)]
# A number of rows: at most what SQL's LIMIT/OFFSET takes.
Count = Annotated[int, Field(le=MAX_COUNT)]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ORDER_SAGA_", extra="ignore")

    database_url: str = "sqlite:///order-saga.db"
    # Downstream base URLs, one per service of `fsm.registry.SERVICES` (the product's and
    # each step's): ORDER_SAGA_SERVICES='{"product": "http://…", "user": …}', or one
    # ORDER_SAGA_<SERVICE>_URL each (Settings(product_url=…) too). None set: the embedded
    # reference services (`serve` mounts them under /services of its own port); some set:
    # every service must have one, and an unknown service is refused (see `_service_urls`).
    services: dict[str, str] = Field(default_factory=dict)
    # `resume` and `worker` host no services: with no URL set they use this, the
    # embedded services of a `serve` running on the default port.
    fallback_services_url: str = "http://127.0.0.1:8000/services"
    # Where the embedded reference services keep their state (survives restarts).
    services_db: str = "order-saga-services.db"
    api_token: str | None = None
    # Issue 17: how long a process trusts its lookup of a key (a revoked key stops working
    # within this, everywhere); the console's session cookie: lifetime, `Secure` flag
    # (None: on unless serving plain http on 127.0.0.1/localhost), OpenID Connect sign-in.
    key_cache_seconds: float = Field(default=2.0, gt=0, le=5)
    session_seconds: int = Field(default=8 * 3600, ge=60, le=30 * 24 * 3600)
    cookie_secure: bool | None = None
    # OpenID Connect sign-in for the console: the issuer (discovery at
    # <issuer>/.well-known/openid-configuration), this app's client, and claim -> role:
    # the ID token's `oidc_role_claim` (a string or a list) is looked up in `oidc_roles`
    # (JSON, e.g. {"saga-operators": "operator"}); the highest role found wins; nobody
    # matching gets `oidc_default_role`, or is refused when that is unset.
    oidc_issuer: str | None = None
    oidc_client_id: str | None = None
    oidc_client_secret: str | None = None
    oidc_role_claim: str = "groups"
    oidc_roles: dict[str, Literal["client", "reader", "operator", "admin"]] = Field(
        default_factory=dict
    )
    oidc_default_role: Literal["client", "reader", "operator", "admin"] | None = None
    # Test hook only: "scope:trigger" -> the process kills itself right after that commit.
    crash_after: str | None = None

    # Per-call HTTP timeout, seconds.
    http_timeout: Seconds = Field(default=5.0, gt=0)
    # Retries of one call within one run (same idempotency key each time). A compensation
    # waits on an open breaker at most max_attempts x backoff_max per run, then parks.
    max_attempts: int = Field(default=4, ge=1, le=100)
    backoff_base: Seconds = Field(default=0.05, ge=0)
    backoff_max: Seconds = Field(default=2.0, ge=0)
    # A forward step still unknown this long after the steps started is treated as failed
    # (and compensated, since it may have been applied).
    step_deadline: Seconds = Field(default=60.0, gt=0)
    # A parked (needs_attention) order is retried by the sweep after `park_min`, then with
    # doubling pauses up to `park_max`. Minutes, not seconds: a parked order is there for a
    # person to look at; retried every few seconds it would flip between compensating and
    # needs_attention under the operator's eyes (and hammer the service that fails it).
    park_min: Seconds = Field(default=300.0, gt=0)
    park_max: Seconds = Field(default=3600.0, gt=0)
    # How long a driver owns an order without renewing its lease.
    lease_seconds: Seconds = Field(default=30.0, gt=0)
    # POST /orders, /orders/{id}/resume and /cancel (and the console's actions) wait this
    # long for their run before answering 202 + Location (the run goes on in the background).
    respond_within: Seconds = Field(default=10.0, ge=0)
    # The sweep of `serve` and `worker`: how often, how old an order must be, batch size.
    sweep_interval: Seconds = Field(default=5.0, gt=0)
    sweep_older_than: Seconds = Field(default=30.0, ge=0)
    sweep_batch: int = Field(default=200, ge=1, le=100_000)
    # Orders one sweep (of `serve` or a `worker`) drives at once; they share commits.
    sweep_concurrency: int = Field(default=32, ge=1, le=1000)
    # An order whose driver died this many times in a row under it (each a takeover of an
    # expired lease with no transition between: orders.interruptions) is held for an
    # operator: the sweep no longer claims it, a person's resume drives it (DBOS's
    # max_recovery_attempts). 5: a move resets the count, so only deaths with no progress
    # at all between count, and a node lost or a deploy by kill hits one order once or
    # twice in a row, not five times; while each death of a crash loop also interrupts
    # every other order of that process, so it is stopped after a few (5 x (lease +
    # SWEEP_OLDER_THAN): ~5 min by default). 0: never held (every takeover drives it).
    max_interruptions: int = Field(default=5, ge=0, le=1000)
    # Every database wait is bounded: a lock held elsewhere, a slow statement (seconds).
    db_lock_timeout: float = Field(default=5.0, gt=0, le=600)
    db_statement_timeout: float = Field(default=30.0, gt=0, le=3600)
    # Group commit: the longest a small batch waits for the writes of the other orders
    # this process drives (seconds; fsm.committer). 0: never wait.
    commit_linger: float = Field(default=0.002, ge=0, le=0.1)
    # `serve --workers N` with N no more than the CPUs it may use: each process pinned to
    # one of them (order_saga.server.serve_processes); false: the scheduler places them.
    pin_workers: bool = True
    # Downstream connection pool of one process (three calls per order in flight).
    http_max_connections: int = Field(default=256, ge=1, le=10_000)
    # Circuit breaker per downstream service (fsm.breaker): opened after this many
    # consecutive transient failures, a single probe after the cool-down (seconds), and the
    # orders that waited are released at most `breaker_batch` calls at a time. Above
    # max_attempts: one order whose call keeps failing spends its run's budget and parks
    # with its reason (what an operator expects, and what the README's recipe shows); it
    # takes failures across orders (an outage) to open the breaker and make orders wait.
    breaker_threshold: int = Field(default=5, ge=1, le=1000)
    breaker_cooldown: Seconds = Field(default=5.0, gt=0)
    breaker_batch: int = Field(default=20, ge=1, le=1000)

    # Operator console (issue 9): log lines as text or JSON; the port on which
    # `order-saga worker` serves /metrics (0: none; run several workers on distinct ports).
    log_format: Literal["text", "json"] = "text"
    worker_metrics_port: int = Field(default=9464, ge=0, le=65535)

    # --- the HTTP edge of `serve` (issue 11): limits, timeouts, shutdown -------------------
    # Request bodies above this are refused (413) before anything parses them.
    max_body_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    # Seconds a client may take to send a request's headers, and then its body (slowloris).
    header_timeout: float = Field(default=10.0, gt=0, le=600)
    body_timeout: float = Field(default=10.0, gt=0, le=600)
    # Idle keep-alive connections are closed after this many seconds.
    keepalive_timeout: int = Field(default=5, ge=1, le=600)
    # Connections + in-flight requests beyond this are answered 503 at once.
    limit_concurrency: int = Field(default=256, ge=1, le=100_000)
    # SIGTERM: in-flight requests and runs get this long to finish, then runs are cancelled
    # (their leases released) and the process exits; orders continue on resume.
    shutdown_grace: float = Field(default=10.0, ge=0, le=3600)
    # Graphviz renderings (svg/png) running at once; more wait their turn off the loop.
    diagram_concurrency: int = Field(default=2, ge=1, le=64)

    # --- keeping the database small (issue 22) ---------------------------------------------
    # Terminal orders whose last move (the terminal one) is older than this many seconds are
    # deleted with their transitions by the background pass of `serve`/`worker` (None: keep
    # everything); `retention_rows` keeps at most the newest N terminal orders. Either may
    # be set alone. Non-terminal and parked orders are never deleted.
    retention_seconds: Seconds | None = Field(default=None, gt=0)
    retention_rows: Count | None = Field(default=None, ge=0)
    # How often `serve` and `worker` fold the new transitions into the heatmap's roll-up
    # (fsm.rollup; 0: only when the heatmap is loaded).
    heat_roll_interval: Seconds = Field(default=60.0, ge=0)
    # How often the background pass runs, and how many orders one short transaction deletes.
    retention_interval: Seconds = Field(default=60.0, gt=0)
    retention_batch: int = Field(default=200, ge=1, le=10_000)
    # The background pass writes every order it deletes here first (gzip JSON lines).
    archive_dir: str | None = None
    # A non-terminal order this many seconds after creation stops waiting (None: no limit):
    # its forward steps not yet succeeded expire and it compensates (the `deadline` edge).
    order_deadline: Seconds | None = Field(default=None, gt=0)

    # --- order events (issue 19): the outbox relay and its destinations ---------------------
    # RabbitMQ: the durable topic exchange `order-saga.events` (unset: no AMQP destination).
    amqp_url: str | None = None
    # The CloudEvents `source` attribute of every order event.
    event_source: str = Field(default="/order-saga", min_length=1, max_length=200)
    # Run a relay in `serve` and `worker` (a child process of theirs: fsm.relay_child;
    # `order-saga relay` runs one alone). Every relay runs at this much lower CPU priority
    # (nice) than the orders: the scheduler serves the orders first when the cores are busy.
    relay: bool = True
    relay_nice: int = Field(default=10, ge=0, le=19)
    # How often an idle relay looks for new events (seconds), and how many it takes at once.
    relay_interval: float = Field(default=0.2, gt=0, le=60)
    relay_batch: int = Field(default=100, ge=1, le=10_000)
    # A busy relay takes a batch at most this often per destination (seconds; after a full
    # batch: at once), so a trickle of events shares one transaction. Adds at most this lag.
    relay_gather: float = Field(default=0.1, ge=0, le=10)
    # A relay holds a destination's cursor (and the retried deliveries it took) this long
    # past its last transaction (kill -9: another takes them after it).
    relay_lease: float = Field(default=30.0, gt=0, le=3600)
    # One delivery attempt's timeout (webhook request, broker confirm), seconds.
    event_timeout: float = Field(default=5.0, gt=0, le=600)
    # Failed deliveries are retried with exponential backoff and jitter for this long after
    # the event (seconds), then dead-lettered (`order-saga events list --failed`).
    event_max_age: Seconds = Field(default=86_400.0, gt=0)
    event_backoff_base: Seconds = Field(default=1.0, gt=0)
    event_backoff_max: Seconds = Field(default=300.0, gt=0)
    # /healthz says "degraded" when a destination's oldest undelivered event is this old.
    event_lag_degraded: Seconds = Field(default=60.0, gt=0)

    @field_validator("amqp_url")
    @classmethod
    def _amqp_url(cls, url: str | None) -> str | None:
        """An amqp(s)://[user:password@]host[:port]/[vhost] URL the relay can connect to;
        the message never quotes it (it may hold a password)."""
        if url is None:
            return None
        parts = urlsplit(url)
        if parts.scheme not in ("amqp", "amqps"):
            raise ValueError("must be an amqp:// or amqps:// URL")
        valid_port(parts)
        if not parts.hostname:
            raise ValueError("has no host")
        return url

    @model_validator(mode="after")
    def _relay_timing(self) -> Settings:
        """A batch's sends may start until a third of the cursor's lease has passed, each
        may take `event_timeout`, and the batch is recorded `relay_gather` (and a read)
        later: all of it must end well within the lease, or another relay takes the cursor
        and sends the same events again, concurrently."""
        if self.event_timeout + self.relay_gather >= self.relay_lease * 2 / 3:
            raise ValueError(
                f"ORDER_SAGA_EVENT_TIMEOUT + ORDER_SAGA_RELAY_GATHER ({self.event_timeout:g} + "
                f"{self.relay_gather:g}) must be below two thirds of ORDER_SAGA_RELAY_LEASE "
                f"({self.relay_lease:g}), or a slow batch outlives the relay's lease and "
                "another relay delivers its events again"
            )
        return self

    @model_validator(mode="after")
    def _ordered_pairs(self) -> Settings:
        """A pause that doubles from a first value up to a bound: the first above the
        bound was silently cut to it (fsm.retry's min(cap, ...)), so one of the two
        settings did nothing. Refused, naming both."""
        for first, bound in ORDERED_PAIRS:
            low, high = getattr(self, first), getattr(self, bound)
            if low > high:
                raise ValueError(
                    f"ORDER_SAGA_{first.upper()} ({low:g}) must not be above "
                    f"ORDER_SAGA_{bound.upper()} ({high:g}): the pause starts at the one and "
                    "grows up to the other"
                )
        return self

    @field_validator("services_db", "oidc_client_id")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        """An empty value is not "the default" (SERVICES_DB) nor "off" (OIDC_CLIENT_ID,
        which turned single sign-on off without a word): unset the variable for that."""
        if value is not None and not value.strip():
            raise ValueError("must not be empty (unset it for the default)")
        return value

    @field_validator("api_token")
    @classmethod
    def _usable_token(cls, token: str | None) -> str | None:
        if token is None:
            return None
        if not token.strip():
            raise ValueError("must not be empty (unset it to turn authentication off)")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in token) or token != token.strip():
            raise ValueError("must not contain control characters or surrounding spaces")
        return token

    @field_validator("oidc_issuer")
    @classmethod
    def _issuer(cls, url: str | None) -> str | None:
        return None if url is None else issuer_url(url)

    @model_validator(mode="after")
    def _oidc_whole(self) -> Settings:
        """Single sign-on needs both its issuer and this app's client id: either alone
        started with sign-on silently off (and, with it, the authentication it turns on)."""
        if bool(self.oidc_issuer) != bool(self.oidc_client_id):
            given, missing = (
                ("ORDER_SAGA_OIDC_ISSUER", "ORDER_SAGA_OIDC_CLIENT_ID")
                if self.oidc_issuer
                else ("ORDER_SAGA_OIDC_CLIENT_ID", "ORDER_SAGA_OIDC_ISSUER")
            )
            raise ValueError(
                f"{given} is set without {missing}: single sign-on needs both "
                "(set the other, or unset it)"
            )
        return self

    @property
    def oidc(self) -> bool:
        return bool(self.oidc_issuer and self.oidc_client_id)

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, url: str) -> str:
        """A database every process can open and share, with a driver installed: a SQLite
        file (not one in memory: each connection would get its own, empty), or PostgreSQL
        through psycopg (`postgresql://` is taken to mean that). The message never quotes
        the URL (it may hold a password)."""
        # SQLAlchemy here, not at the top: a command that reads no database (`diagram`,
        # every command's log format) would pay ~0.2 s CPU importing it.
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        if not url.startswith(("sqlite:", "postgresql")):
            raise ValueError(f"must be {ACCEPTED_DATABASES}")
        try:
            parsed = make_url(url)
        except (ArgumentError, ValueError):  # the message would quote it, password and all
            raise ValueError("is not a valid database URL") from None
        if parsed.drivername == "sqlite":
            name = parsed.database or ""  # ":memory:", "file::memory:" (a URI), ...
            if not name or ":memory:" in name or parsed.query.get("mode") == "memory":
                raise ValueError(
                    "is a SQLite database in memory, which every connection sees empty: "
                    "give a file, sqlite:///<file>"
                )
            return url
        if parsed.drivername == "postgresql":
            return url.replace("postgresql://", "postgresql+psycopg://", 1)
        if parsed.drivername == "postgresql+psycopg":
            return url
        raise ValueError(f"names a driver order-saga does not use: it must be {ACCEPTED_DATABASES}")

    @field_validator("fallback_services_url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        return http_base_url(url)

    @model_validator(mode="before")
    @classmethod
    def _service_urls(cls, data: Any) -> Any:
        """ORDER_SAGA_SERVICES merged with the ORDER_SAGA_<SERVICE>_URL variables (and
        `<service>_url` arguments); refused, naming the variable, if a URL is not one a
        client can call (`fsm.urls.http_base_url`), a service is unknown, or some services
        have a URL and others not."""
        if not isinstance(data, dict):
            return data
        names = [service.name for service in SERVICES]
        # Absent: no URLs given this way. Given, it is an object: [], null, false, 0 or ""
        # are not "no services" (README), however falsy. (pydantic-settings drops a
        # variable whose JSON is null: it is seen in the environment itself.)
        given_urls = data.get("services", None if _in_environment("SERVICES") else {})
        if not isinstance(given_urls, dict):
            raise ValueError(
                'ORDER_SAGA_SERVICES must be a JSON object: {"<service>": "http://…", …}'
            )
        urls = dict(given_urls)
        for name in names:
            given = data.pop(f"{name}_url", None) or os.environ.get(_env(name))
            if given is not None:
                urls[name] = given
        unknown = sorted(set(urls) - set(names))
        if unknown:
            raise ValueError(
                f"ORDER_SAGA_SERVICES: unknown service {', '.join(unknown)} "
                f"(the services are {', '.join(names)})"
            )
        checked = {}
        for name, url in urls.items():
            if not isinstance(url, str):
                raise ValueError(f"{_env(name)} must be an http:// or https:// URL")
            try:
                checked[name] = http_base_url(url)
            except ValueError as exc:
                raise ValueError(f"{_env(name)} {exc}") from None
        missing = [name for name in names if name not in urls]
        if urls and missing:
            raise ValueError(
                f"no URL for the {', '.join(missing)} service ({', '.join(map(_env, missing))} "
                "or ORDER_SAGA_SERVICES): set every service's URL, or none for the embedded ones"
            )
        return {**data, "services": checked}

    @property
    def embedded_services(self) -> bool:
        return not self.services


# (first, bound) of each doubling pause: the first may not be above the bound.
ORDERED_PAIRS = (
    ("backoff_base", "backoff_max"),
    ("park_min", "park_max"),
    ("event_backoff_base", "event_backoff_max"),
)
ACCEPTED_DATABASES = "a sqlite:///<file> or postgresql+psycopg:// (or postgresql://) URL"


def _env(service: str) -> str:
    return f"ORDER_SAGA_{service.upper()}_URL"


def _in_environment(field: str) -> bool:
    """Whether ORDER_SAGA_<FIELD> is set, in any case (pydantic-settings reads it so)."""
    variable = f"ORDER_SAGA_{field}".upper()
    return any(name.upper() == variable for name in os.environ)


# ORDER_SAGA_* variables that are no Settings field yet are read: the steps plugged in
# (fsm.registry), and the test suite's and benchmarks' own (TEST_*, BENCH_*, PROMTOOL).
NOT_FIELDS = frozenset({"STEP_MODULES", "PROMTOOL"})
TOOLING_PREFIXES = ("TEST_", "BENCH_")


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """A line for each ORDER_SAGA_* variable of `environ` that no setting reads (a typo,
    `API_TOKENS` for `API_TOKEN`, ran the API open), naming it and the closest known name;
    never its value. Names are matched in any case, as pydantic-settings reads them."""
    known = (
        {name.upper() for name in Settings.model_fields}
        | {f"{service.name.upper()}_URL" for service in SERVICES}
        | NOT_FIELDS
    )
    lines = []
    for variable in sorted(environ):
        name = variable.upper().removeprefix("ORDER_SAGA_")
        if name == variable.upper() or name in known or name.startswith(TOOLING_PREFIXES):
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1)
        hint = f"; did you mean ORDER_SAGA_{close[0]}?" if close else ""
        lines.append(f"{variable} is not an order-saga setting: ignored{hint}")
    return lines


@lru_cache
def get_settings() -> Settings:
    return Settings()


SETTINGS_ERRORS = (ValidationError, SettingsError)  # what reading Settings() may raise


class LogFormatSetting(BaseSettings):
    """ORDER_SAGA_LOG_FORMAT alone, read as Settings reads it (same prefix, same type):
    what every command logs in, known before the command runs. Settings() whole would
    validate the rest too, the database URL with SQLAlchemy (~0.3 s CPU to import, at the
    start of every command, `diagram` and `orders show` alike), and parse JSON settings a
    command may never read."""

    model_config = Settings.model_config

    log_format: Literal["text", "json"] = "text"


def settings_problem(exc: Exception) -> str:
    """`invalid ORDER_SAGA_<FIELD>: <why>` for one of SETTINGS_ERRORS, naming the first bad
    variable. Never its value (pydantic's own message quotes it: a password in a database
    URL, a token, a client secret)."""
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        field = "ORDER_SAGA_" + str(err["loc"][0]).upper() if err["loc"] else "settings"
        return f"invalid {field}: {err['msg']}"
    # pydantic-settings names the field only in its message: 'error parsing value for
    # field "services" from source "EnvSettingsSource"' (a JSON field that is not JSON).
    named = re.search(r'error (parsing|getting) value for field "(\w+)"', str(exc))
    field = f"ORDER_SAGA_{named.group(2).upper()}" if named else "settings"
    parsing = named is not None and named.group(1) == "parsing"
    return f"invalid {field}: {'not valid JSON' if parsing else 'unreadable'}"
