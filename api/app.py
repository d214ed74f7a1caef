"""create_app(): the orchestrator's FastAPI application, its lifespan and routers."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from api import diagram, orders
from api.deps import StoreDep
from api.runner import Runner
from fsm.breaker import Breakers
from fsm.clients import Services
from fsm.errors import (
    CircuitOpen,
    ConcurrencyError,
    CorruptOrder,
    InvalidMove,
    OrderNotFound,
    StoreUnavailable,
)
from fsm.machine import MACHINE_VERSION
from fsm.metrics import ORDERS
from fsm.settings import Settings, get_settings
from fsm.upgrade import guard
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
        breakers = Breakers.from_settings(settings)
        app.state.breakers = breakers
        async with open_saga(
            settings, services=services, fallback_url=embedded_url, breakers=breakers
        ) as saga:
            guard(saga.store)  # orders the installed machine cannot drive: logged, never swept
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

    @app.exception_handler(CircuitOpen)
    async def _circuit_open(_: Request, exc: CircuitOpen) -> JSONResponse:
        retry_after = str(max(1, math.ceil(exc.retry_after)))
        body = {"detail": str(exc), "code": exc.code, "service": exc.service}
        return JSONResponse(body, status_code=503, headers={"Retry-After": retry_after})

    @app.get("/healthz", tags=["ops"])
    def healthz(store: StoreDep, request: Request) -> dict[str, Any]:
        with store.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        breakers: Breakers | None = getattr(request.app.state, "breakers", None)
        not_closed = breakers.not_closed() if breakers else {}
        return {
            "status": "degraded" if not_closed else "ok",
            "database": store.engine.dialect.name,
            "machine_version": MACHINE_VERSION,
            "breakers": not_closed,  # services whose circuit breaker is open or half-open
        }

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
