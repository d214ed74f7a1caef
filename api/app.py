"""create_app(): the orchestrator's FastAPI application, its lifespan, routers and edge.

The edge wraps everything, the mounted reference services included: HEAD served as GET
without the body (`api/head.py`), who is calling and
whether their role may (`api/auth.py`, from the table in `api/access.py`), then the body
cap and strict JSON (`api/guard.py`). Every error answer
goes through `api/problems.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from asgi_correlation_id import CorrelationIdMiddleware
from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from sqlalchemy.exc import SQLAlchemyError

from api import (
    actions,
    diagram,
    direct,
    events_page,
    oidc,
    openapi,
    ops,
    orders,
    problems,
    redoc,
    ui,
)
from api.auth import Authenticator, AuthGate
from api.guard import BodyGuard
from api.head import HeadAsGet
from api.runner import Runner
from fsm import upkeep
from fsm.clients import Services
from fsm.health import WriteHealth
from fsm.settings import Settings, get_settings
from fsm.wiring import open_saga

log = logging.getLogger("order_saga.api")


def create_app(
    settings: Settings | None = None,
    *,
    services: Services | None = None,
    embedded_url: str = "http://127.0.0.1:8000/services",
    sweep: bool = True,
) -> FastAPI:
    """The API. `services` overrides the downstream clients (tests); otherwise they are
    built from settings, and with no URLs configured the reference services are mounted
    under /services and called over HTTP at `embedded_url`. `sweep=False` turns off only
    the recovery sweep; retention, roll-up and partition upkeep run regardless."""
    settings = settings or get_settings()
    authenticator = Authenticator(
        None,
        api_token=settings.api_token,
        oidc=settings.oidc,
        ttl=settings.key_cache_seconds,
        session_seconds=settings.session_seconds,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_saga(
            settings,
            services=services,
            embedded_url=embedded_url,
            breakers=True,
            upgrade_guard=True,  # orders the installed machine cannot drive: never swept
        ) as saga:
            runner = Runner(store=saga.store, executor=saga.executor, settings=settings)
            app.state.store, app.state.executor, app.state.runner = (
                saga.store,
                saga.executor,
                runner,
            )
            app.state.health = WriteHealth(saga.store)
            authenticator.engine = saga.store.engine
            try:
                await authenticator.setup()
            except SQLAlchemyError as exc:  # the database is down: the gate answers 503
                log.warning("could not read the deployment's secrets at start (%s)", exc)
            app.state.breakers = saga.breakers
            runner.start_upkeep()  # whatever `sweep` says: --no-sweep is about recovery
            if sweep:
                runner.start_sweeper()
            checking = None  # single sign-on: its provider's discovery, fetched once aside
            if app.state.oidc is not None:
                checking = asyncio.create_task(oidc.check_at_start(app.state.oidc))
            # order events: delivered from a child process (and any relay), when RELAY is on
            relay = upkeep.start_relay(store=saga.store, settings=settings)
            try:
                yield
            finally:
                if checking is not None:
                    checking.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await checking
                if relay is not None:
                    await upkeep.stop([relay])
                await runner.stop()
                await authenticator.settle()  # a key lookup in flight, before the store closes

    app = FastAPIOffline(  # /docs and /redoc from assets shipped in the package, no CDN
        redoc_url=None,  # api/redoc.py: the same page, its logo not from a CDN either
        title="order-saga",
        version="0.1.0",
        lifespan=lifespan,
        description="Durable order orchestrator (saga as a persisted state machine)",
    )
    app.state.settings = settings
    app.state.authenticator = authenticator

    def stop_starting() -> None:
        """Shutdown has begun (order_saga.server.DrainingServer): no new work is picked up
        while the requests in flight get their grace."""
        runner: Runner | None = getattr(app.state, "runner", None)
        if runner is not None:
            runner.stop_sweeping()

    app.state.stop_starting = stop_starting
    app.state.diagrams = diagram.Renderer(concurrency=settings.diagram_concurrency)
    problems.install(app)
    openapi.install(app)
    # In the app's own table, not behind an included router: FastAPI matches an included
    # router's routes twice per request (POST /orders: once per order).
    app.router.routes.extend(orders.router.routes)
    app.include_router(diagram.router)
    app.include_router(redoc.router)
    # Operator console (issue 9): the /ui pages, their assets, a request id on every line.
    app.include_router(ui.login_router)  # /ui/login, /ui/logout (issue 17)
    app.include_router(oidc.router)  # /ui/oidc/login, /ui/oidc/callback (404 unless set)
    app.state.oidc = oidc.Provider(settings) if settings.oidc else None
    app.include_router(ui.router)
    app.include_router(events_page.router)  # /ui/events (issue 19)
    app.include_router(actions.router)
    app.mount("/ui/static", ui.static, name="ui-static")
    # Innermost: POST /orders straight to its reader (api/direct.py), inside the request id.
    app.add_middleware(direct.Shortcut, routes=app.router.routes)
    app.add_middleware(CorrelationIdMiddleware)

    # /healthz, /readyz, /metrics: in the app's own table too, after the console's mounts.
    app.router.routes.extend(ops.router.routes)

    if services is None and settings.embedded_services:
        from downstream.app import create_services_app

        app.mount("/services", create_services_app(settings.services_db))
    # Added last = outermost: the caller is checked before a body is even read.
    app.add_middleware(
        BodyGuard,
        max_bytes=settings.max_body_bytes,
        read_timeout=settings.body_timeout,
        routes=app.router.routes,  # read when the stack is built, as AuthGate's
    )
    app.add_middleware(
        AuthGate,
        authenticator=authenticator,
        routes=app.router.routes,  # read when the stack is built: every route by then
        cookie_secure=settings.cookie_secure,
    )
    app.add_middleware(HeadAsGet)  # outermost: HEAD is GET without the body, everywhere
    return app
