"""The engine's composition root: Settings -> Store, Services, Executor, built in one place.

The API's lifespan, the CLI's commands, the tests and the benchmarks all call `open_saga`,
so how the engine is put together (timeouts, pool sizes, retry policy, test hooks) is
written once. It composes `fsm` only: the API and the reference services are not its
business (an unset *_URL falls back to `fallback_url`, e.g. the embedded services).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import httpx
from httpx_aiohttp import HttpxAiohttpClient

from fsm.breaker import Breakers
from fsm.clients import Services, http_services
from fsm.executor import Executor
from fsm.retry import RetryPolicy
from fsm.settings import Settings
from fsm.store import Store, make_engine


@dataclass(frozen=True)
class Saga:
    """A running engine: its settings, its store (with the commit thread) and executor."""

    settings: Settings
    store: Store
    executor: Executor


def build_store(settings: Settings) -> Store:
    engine = make_engine(
        settings.database_url,
        lock_timeout=settings.db_lock_timeout,
        statement_timeout=settings.db_statement_timeout,
    )
    return Store(
        engine,
        lease_seconds=settings.lease_seconds,
        lock_timeout=settings.db_lock_timeout,
        statement_timeout=settings.db_statement_timeout,
    )


def http_services_for(
    settings: Settings, client: httpx.AsyncClient, *, fallback_url: str | None = None
) -> Services:
    fallback = fallback_url or settings.fallback_services_url
    return http_services(
        client,
        product_url=settings.product_url or fallback,
        user_url=settings.user_url or fallback,
        inventory_url=settings.inventory_url or fallback,
        shipping_url=settings.shipping_url or fallback,
    )


def http_client(settings: Settings) -> httpx.AsyncClient:
    """httpx's API on aiohttp's connection pool (httpx-aiohttp). httpcore's own pool checks
    every pooled connection's socket on each request, which made the HTTP client the
    largest CPU cost of an order under load (BENCHMARKS.md, "The HTTP path")."""
    # Three calls per order in flight: the pool must not be what limits concurrency.
    limits = httpx.Limits(
        max_connections=settings.http_max_connections,
        max_keepalive_connections=settings.http_max_connections,
    )
    return HttpxAiohttpClient(timeout=settings.http_timeout, limits=limits)


def build_executor(settings: Settings, *, store: Store, services: Services) -> Executor:
    return Executor(
        store=store,
        services=services,
        policy=RetryPolicy.from_settings(settings),
        crash_after=settings.crash_after,
    )


@asynccontextmanager
async def open_saga(
    settings: Settings,
    *,
    services: Services | None = None,
    fallback_url: str | None = None,
    breakers: Breakers | None = None,
) -> AsyncIterator[Saga]:
    """Build the engine; on exit stop renewing leases, commit what is queued, close.
    With `breakers`, every service client goes through its service's circuit breaker."""
    store = build_store(settings)
    try:
        async with AsyncExitStack() as stack:
            if services is None:
                client = await stack.enter_async_context(http_client(settings))
                services = http_services_for(settings, client, fallback_url=fallback_url)
            if breakers is not None:
                services = breakers.wrap(services)
            executor = build_executor(settings, store=store, services=services)
            try:
                yield Saga(settings=settings, store=store, executor=executor)
            finally:
                await executor.aclose()
    finally:
        await asyncio.to_thread(store.close)
        store.engine.dispose()
