"""The operations routes: /healthz (liveness, and what is degraded), /readyz (may this
process take writes?) and /metrics (Prometheus). Public (api/access.py): probes and
scrapers carry no credentials. They read the store and the app's state; they change
nothing.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from api import problems
from api.deps import StoreDep
from fsm import metrics as fsm_metrics
from fsm import subscriptions
from fsm.breaker import Breakers
from fsm.errors import StoreUnavailable
from fsm.health import WriteHealth, WriteStatus
from fsm.store import Store
from fsm.version import MACHINE_VERSION

# Added to the app's own table (`app.router.routes.extend`), as the orders' routes: an
# included router is matched apart, and the edge's middleware read the app's own routes.
router = APIRouter(tags=["ops"])

_HEALTHY = {"status": "ok", "database": "postgresql", "machine_version": MACHINE_VERSION}
_METRICS_EXAMPLE = 'order_saga_orders{status="needs_attention"} 1.0\n'


def _select_one(store: Store) -> None:
    with store.engine.connect() as conn:
        conn.execute(text("SELECT 1"))


async def _writes(request: Request) -> WriteStatus:
    health: WriteHealth = request.app.state.health
    return await health.check()


@router.get(
    "/healthz",
    responses={
        200: {"content": {"application/json": {"example": _HEALTHY}}},
        503: {"model": problems.Problem, "description": "a dependency is down"},
    },
)
async def healthz(store: StoreDep, request: Request) -> dict[str, Any]:
    """200 when the database answers: "ok", or "degraded" with why (`writes`: the last
    write failed or a write cannot get through now; `breakers`: operations whose circuit
    breaker is open; `events_lagging`: destinations whose oldest undelivered event is
    older than EVENT_LAG_DEGRADED; `events_dead`: destinations with dead letters). 503
    naming the dependency that does not answer at all."""
    try:
        await asyncio.to_thread(_select_one, store)
    except (SQLAlchemyError, StoreUnavailable) as exc:
        raise StoreUnavailable(f"database: {type(exc).__name__}") from exc
    writes = await _writes(request)
    breakers: Breakers | None = getattr(request.app.state, "breakers", None)
    not_closed = breakers.not_closed() if breakers else {}
    limit = request.app.state.settings.event_lag_degraded
    backlog = await asyncio.to_thread(subscriptions.lags_if_known, store)
    lagging = {name: round(b.seconds, 3) for name, b in backlog.items() if b.seconds > limit}
    dead = {name: b.dead for name, b in backlog.items() if b.dead}
    degraded = not_closed or not writes.writable or lagging or dead
    return {
        "status": "degraded" if degraded else "ok",
        "database": store.engine.dialect.name,
        "machine_version": MACHINE_VERSION,
        "writes": {"ok": writes.writable, "reason": writes.reason},
        "breakers": not_closed,  # operations whose circuit breaker is open or half-open
        # event destinations whose oldest undelivered event is older than
        # ORDER_SAGA_EVENT_LAG_DEGRADED seconds: name -> its age
        "events_lagging": lagging,
        # event destinations with dead letters (each holds its order's later events
        # until `events redeliver`): name -> how many
        "events_dead": dead,
    }


@router.get(
    "/readyz",
    responses={
        200: {"content": {"application/json": {"example": {"status": "ready"}}}},
        503: {"model": problems.Problem, "description": "this process cannot take writes"},
    },
)
async def readyz(request: Request) -> Any:
    """Readiness (send orders here?): 200 while writes go through; 503 with the reason
    when the last write failed or a write cannot get through now (a held lock, a full
    disk, a refused connection). /healthz stays the liveness probe."""
    writes = await _writes(request)
    if not writes.writable:
        return problems.problem(
            503,
            writes.reason or "cannot write",
            code="not_ready",
            headers={"Retry-After": "1"},
            dependency="database",
        )
    return {"status": "ready"}


@router.get(
    "/metrics",
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
    body = generate_latest(fsm_metrics.of_store(store))
    return Response(body, media_type=CONTENT_TYPE_LATEST)
