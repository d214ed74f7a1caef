"""The engine's composition root: Settings -> store, HTTP services, breakers, executor.

`open_saga` is the only place the engine is put together: the API's lifespan, every CLI
command, the tests' fixtures and the benchmarks call it (`open_store` when all they need
is the store: reads and operator actions that call no service; `open_engine` for a
command's own statements on the read pool alone). So how the engine is assembled
(timeouts, pool sizes, retry policy, our API token on calls to our own embedded services,
circuit breakers, the start-up upgrade guard, test hooks) is written once, and
`tests/test_layers.py` fails when an entry point builds a `Store`, an `Executor` or a
read pool (`make_engine`) itself.

It composes `fsm` only: the API, the CLI and the reference services are not its business.
An unset *_URL means the embedded reference services at `embedded_url` (default
`settings.fallback_services_url`, where `serve` mounts them), and only calls there carry
`settings.api_token`: a real downstream service configured by URL never sees it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from fsm.clock import check_database_clock
from fsm.engine import close_engine
from fsm.queries import utcnow
from fsm.settings import Settings
from fsm.store import Store, make_engine

if TYPE_CHECKING:  # the engine's other parts are imported where they are built: a caller
    import httpx  # that only opens the store (`orders list`, `keys`) loads none of them
    from sqlalchemy import Engine

    from fsm.breaker import Breakers
    from fsm.clients import AiohttpTransport, Services, Transport
    from fsm.executor import Executor


@dataclass(frozen=True)
class Saga:
    """A running engine: its settings, store (with the commit thread), executor, and the
    circuit breakers its service calls go through (None: unguarded)."""

    settings: Settings
    store: Store
    executor: Executor
    breakers: Breakers | None = None


def _engine(settings: Settings) -> Engine:
    """The read pool with the settings' bounded waits (DB_LOCK_TIMEOUT, DB_STATEMENT_TIMEOUT):
    the one place a command's or the store's engine is made."""
    return make_engine(
        settings.database_url,
        lock_timeout=settings.db_lock_timeout,
        statement_timeout=settings.db_statement_timeout,
    )


@contextmanager
def open_engine(settings: Settings) -> Iterator[Engine]:
    """The read pool alone, with the waits the settings bound, as the store's; closed for
    good on the way out. For a command's own statements on no store (the database
    clock's check, client keys, `prune`, `check-upgrade`, the look for a database)."""
    engine = _engine(settings)
    try:
        yield engine
    finally:
        close_engine(engine)


def build_store(settings: Settings, *, synchronous_commit: bool = True) -> Store:
    """The store as `open_saga` builds it, for a caller that closes it (prefer `open_store`).
    `synchronous_commit=False`: `relay_store`'s commits."""
    return Store(
        _engine(settings),
        lease_seconds=settings.lease_seconds,
        lock_timeout=settings.db_lock_timeout,
        statement_timeout=settings.db_statement_timeout,
        commit_linger=settings.commit_linger,
        event_source=settings.event_source,
        synchronous_commit=synchronous_commit,
        max_interruptions=settings.max_interruptions,
    )


def relay_store(settings: Settings) -> Store:
    """A relay's store. Its commits only record deliveries (a cursor moved, its lease
    renewed, exception rows): one lost to a database crash only means those events are
    sent again, which at-least-once allows, and the server writes its WAL in order, so any
    synchronous commit after it (an order's) makes it durable too. On PostgreSQL they do
    not wait for the disk, so the relay's WAL flushes no longer queue with the orders'
    (relay on with free sends: 81 % -> 90-94 % of relay off; BENCHMARKS.md). A relay
    never writes an order. Refused (ClockSkew) when this host's clock is too far from the
    database's for the cursors' leases (fsm.clock)."""
    store = build_store(settings, synchronous_commit=False)
    try:
        check_database_clock(store.engine, lease_seconds=settings.relay_lease)
    except BaseException:
        close_store(store)
        raise
    return store


def close_store(store: Store) -> None:
    """Commit what is queued, stop the writer thread, close the read pool for good."""
    store.close()
    close_engine(store.engine)


@contextmanager
def open_store(settings: Settings) -> Iterator[Store]:
    """The store alone, as `open_saga` builds it; closed (writer thread stopped, pool
    disposed) on the way out. For reads and for operator actions that call no service."""
    store = build_store(settings)
    try:
        yield store
    finally:
        close_store(store)


class BearerFor:
    """Our own API token on calls to our own embedded services (`prefix`), and only
    there, so it never leaks to a real downstream service configured by URL. Called by
    the transport with each request's URL and headers."""

    def __init__(self, token: str | None, prefix: str) -> None:
        self.header = f"Bearer {token}" if token else None  # aiohttp sends it as UTF-8
        self.prefix = prefix.rstrip("/") + "/"

    def __call__(self, url: str, headers: dict[str, str]) -> None:
        if self.header is not None and url.startswith(self.prefix):
            headers["Authorization"] = self.header


def http_client(settings: Settings) -> AiohttpTransport:
    """The service clients' transport: aiohttp's connection pool used directly, one client
    layer (httpx's own pool checks every pooled connection's socket on each request, and
    httpx over aiohttp paid for two layers: BENCHMARKS.md, "The HTTP path, issue 20")."""
    from fsm.clients import AiohttpTransport

    # Three calls per order in flight: the pool must not be what limits concurrency.
    return AiohttpTransport(
        timeout=settings.http_timeout, max_connections=settings.http_max_connections
    )


def http_services_for(
    settings: Settings,
    client: Transport | httpx.AsyncClient,
    *,
    embedded_url: str | None = None,
) -> Services:
    """A client per service of the registry over `client`; with no URL set (settings
    refuse some without the others), every one at `embedded_url`."""
    from fsm.clients import Services
    from fsm.registry import SERVICES

    embedded = embedded_url or settings.fallback_services_url
    return Services(
        **{s.name: s.client(client, settings.services.get(s.name, embedded)) for s in SERVICES}
    )


def build_executor(settings: Settings, *, store: Store, services: Services) -> Executor:
    """The executor as `open_saga` builds it, for a caller that closes it (`aclose`)."""
    from fsm.executor import Executor
    from fsm.retry import RetryPolicy

    executor = Executor(
        store=store,
        services=services,
        policy=RetryPolicy.from_settings(settings),
        crash_after=settings.crash_after,
    )
    store.committer.company = executor.driving  # the orders whose writes a commit may wait for
    return executor


@asynccontextmanager
async def open_saga(
    settings: Settings,
    *,
    services: Services | None = None,
    embedded_url: str | None = None,
    breakers: bool = False,
    upgrade_guard: bool = False,
    require_database: bool = False,
    store: Store | None = None,
    clock: Callable[[], datetime] = utcnow,
) -> AsyncIterator[Saga]:
    """Build the engine; on exit stop renewing leases, commit what is queued, close.

    - `services`: the downstream clients (tests, benchmarks); by default HTTP clients from
      `settings`, with `settings.api_token` on calls to the embedded services at
      `embedded_url` (default `settings.fallback_services_url`) and only there.
    - `breakers`: every service call goes through its service's circuit breaker.
    - `upgrade_guard`: the start-up check of a long-running process (`serve`, `worker`):
      orders the installed machine cannot drive are logged and never swept.
    - `require_database`: fail at once when the database does not answer (`worker`);
      `serve` starts anyway and answers 503 until it does.
    - `store`: drive through a store the caller opened with `open_store` (and closes).
    - `clock`: this process's clock, compared with the database's at start (fsm.clock:
      ClockSkew when it is off by more than a quarter of the lease); tests skew it.
    """
    from fsm import keys
    from fsm.breaker import Breakers
    from fsm.upgrade import guard

    owned = store is None
    the_store = build_store(settings) if store is None else store
    try:
        async with AsyncExitStack() as stack:
            if services is None:
                embedded = embedded_url or settings.fallback_services_url
                client = await stack.enter_async_context(http_client(settings))
                # ORDER_SAGA_API_TOKEN, else the deployment's internal token (issue 17)
                token = settings.api_token or await asyncio.to_thread(
                    keys.internal_token, engine=the_store.engine
                )
                client.sign = BearerFor(token, embedded)
                services = http_services_for(settings, client, embedded_url=embedded)
            guarded = Breakers.from_settings(settings) if breakers else None
            if guarded is not None:
                services = guarded.wrap(services)
            if require_database:
                with the_store.engine.connect():
                    pass  # no database: fail now, in one line, before any check logs
            await asyncio.to_thread(
                check_database_clock,
                the_store.engine,
                lease_seconds=settings.lease_seconds,
                clock=clock,
            )
            if upgrade_guard:
                guard(the_store)
            executor = build_executor(settings, store=the_store, services=services)
            try:
                yield Saga(settings=settings, store=the_store, executor=executor, breakers=guarded)
            finally:
                await executor.aclose()
    finally:
        if owned:
            await asyncio.to_thread(close_store, the_store)
