"""create_app(): the orchestrator's FastAPI application, its lifespan and routers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from asgi_correlation_id import CorrelationIdMiddleware
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from api import actions, diagram, orders, ui
from api.deps import StoreDep
from api.runner import Runner
from fsm.clients import Services
from fsm.errors import (
    ConcurrencyError,
    CorruptOrder,
    InvalidMove,
    OrderNotFound,
    StoreUnavailable,
)
from fsm.metrics import exposition
from fsm.settings import Settings, get_settings
from fsm.wiring import open_saga

_HEALTHY = {"status": "ok", "database": "postgresql"}
_METRICS_EXAMPLE = 'order_saga_orders{status="needs_attention"} 1.0\n'


def create_app(
    settings: Settings | None = None,
    *,
    services: Services | None = None,
    embedded_url: str = "http://127.0.0.1:8000/services",
    sweep: bool = True,
) -> FastAPI:
    """The API. `services` overrides the downstream clients (tests); otherwise they are
    built from settings, and with no URLs configured the reference services are mounted
    under /services and called over HTTP at `embedded_url`."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_saga(settings, services=services, fallback_url=embedded_url) as saga:
            runner = Runner(store=saga.store, executor=saga.executor, settings=settings)
            app.state.store, app.state.executor, app.state.runner = (
                saga.store,
                saga.executor,
                runner,
            )
            if sweep:
                runner.start_sweeper()
            try:
                yield
            finally:
                await runner.stop()

    app = FastAPIOffline(  # /docs and /redoc from assets shipped in the package, no CDN
        title="order-saga",
        version="0.1.0",
        lifespan=lifespan,
        description="Durable order orchestrator (saga as a persisted state machine)",
    )
    app.state.settings = settings
    app.include_router(orders.router)
    app.include_router(diagram.router)
    # Operator console (issue 9): the /ui pages, their assets, a request id on every line.
    app.include_router(ui.router)
    app.include_router(actions.router)
    app.mount("/ui/static", ui.static, name="ui-static")
    app.add_middleware(CorrelationIdMiddleware)

    @app.exception_handler(OrderNotFound)
    async def _not_found(_: Request, exc: OrderNotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(ConcurrencyError)
    async def _busy(_: Request, exc: ConcurrencyError) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "code": exc.code}, status_code=409)

    @app.exception_handler(CorruptOrder)
    async def _corrupt(_: Request, exc: CorruptOrder) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "code": exc.code}, status_code=500)

    @app.exception_handler(StoreUnavailable)
    async def _unavailable(_: Request, exc: StoreUnavailable) -> JSONResponse:
        # Nothing was decided: the client may retry (with its Idempotency-Key) shortly.
        return JSONResponse(
            {"detail": str(exc), "code": exc.code}, status_code=503, headers={"Retry-After": "1"}
        )

    @app.exception_handler(InvalidMove)
    async def _invalid(_: Request, exc: InvalidMove) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "code": exc.code}, status_code=409)

    @app.get(
        "/healthz",
        tags=["ops"],
        responses={200: {"content": {"application/json": {"example": _HEALTHY}}}},
    )
    def healthz(store: StoreDep) -> dict[str, str]:
        """Liveness and readiness: answers once the database answers a query."""
        with store.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return {"status": "ok", "database": store.engine.dialect.name}

    @app.get(
        "/metrics",
        tags=["ops"],
        response_class=Response,
        responses={
            200: {
                "content": {CONTENT_TYPE_LATEST: {"example": _METRICS_EXAMPLE}},
                "description": "Prometheus text exposition format",
            }
        },
    )
    def metrics(store: StoreDep) -> Response:
        """Prometheus metrics; `order_saga_orders{status}` is counted in SQL per scrape."""
        return Response(exposition(store.count_by_status), media_type=CONTENT_TYPE_LATEST)

    if services is None and settings.embedded_services:
        from downstream.app import create_services_app

        app.mount("/services", create_services_app(settings.services_db))
    return app
