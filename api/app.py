"""create_app(): the orchestrator's FastAPI application, its lifespan and routers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from api import diagram, orders
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
from fsm.metrics import ORDERS
from fsm.settings import Settings, get_settings
from fsm.wiring import open_saga


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

    app = FastAPI(
        title="order-saga",
        version="0.1.0",
        lifespan=lifespan,
        description="Durable order orchestrator (saga as a persisted state machine)",
    )
    app.state.settings = settings
    app.include_router(orders.router)
    app.include_router(diagram.router)

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

    @app.get("/healthz", tags=["ops"])
    def healthz(store: StoreDep) -> dict[str, str]:
        with store.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return {"status": "ok", "database": store.engine.dialect.name}

    @app.get(
        "/metrics",
        tags=["ops"],
        response_class=Response,
        responses={
            200: {
                "content": {CONTENT_TYPE_LATEST: {}},
                "description": "Prometheus text exposition format",
            }
        },
    )
    def metrics(store: StoreDep) -> Response:
        for status, count in store.count_by_status().items():
            ORDERS.labels(status=status).set(count)
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    if services is None and settings.embedded_services:
        from downstream.app import create_services_app

        app.mount("/services", create_services_app(settings.services_db))
    return app
