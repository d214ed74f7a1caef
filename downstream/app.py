"""The four reference services (plus `/_faults` and friends) as one FastAPI app.

"Someone else's service": imports nothing from `fsm` or `api`, so a real service could
replace it behind the same URLs.
"""

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from downstream import admin, services, sink
from downstream.faults import FaultBoard
from downstream.store import Store


def create_services_app(state_path: str | None = None) -> FastAPI:
    """Build the app. `state_path=None` keeps state in memory (fresh seed per app); a file
    path keeps it in SQLite (WAL), created and seeded on first use, surviving restarts.
    Faults are always in memory, this process's own (`serve --workers N`: one board per
    worker). Call `app.state.store.close()` when done with the app."""
    app = FastAPI(
        title="order-saga reference services",
        summary="product, user (payment), inventory and shipping, with fault injection",
        version="0.1.0",
    )
    app.state.store = Store(state_path)
    app.state.faults = FaultBoard()
    app.state.sink = sink.Sink()
    # The services' routes sit in the app's own table, not behind an included router:
    # FastAPI matches an included router's routes twice per request (~7 % of a call's CPU).
    app.router.routes.extend(services.router.routes)
    app.include_router(admin.router)
    app.include_router(sink.router)
    app.add_middleware(services.DirectCalls)  # innermost: a saga's calls skip the routing

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default echoes each bad input, and NaN or a 10 MB body cannot or
        # should not be echoed: say where and what only.
        issues = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg")), "type": str(e.get("type"))}
            for e in exc.errors()
        ]
        return JSONResponse({"detail": issues}, status_code=422)

    return app
