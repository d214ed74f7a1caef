"""FastAPI dependencies of the reference services, as `Annotated` aliases.

The store and the fault board live on `app.state` (set by `create_services_app`), so the
same app works alone on a port or mounted under another app's path. `async def`, though
they await nothing: a plain `def` dependency runs in FastAPI's thread pool (a thread hop).
"""

from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.responses import JSONResponse

from downstream.faults import FaultBoard
from downstream.store import Outcome, Store


async def get_store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


async def get_faults(request: Request) -> FaultBoard:
    faults: FaultBoard = request.app.state.faults
    return faults


StoreDep = Annotated[Store, Depends(get_store)]
FaultsDep = Annotated[FaultBoard, Depends(get_faults)]
MAX_KEY = 500
IdempotencyKey = Annotated[
    str | None, Header(alias="Idempotency-Key", min_length=1, max_length=MAX_KEY)
]


def respond(outcome: Outcome) -> JSONResponse:
    """An `Outcome` as HTTP; a replayed answer says so in `Idempotent-Replayed: true`."""
    headers = {"Idempotent-Replayed": "true"} if outcome.replayed else None
    return JSONResponse(outcome.body, status_code=outcome.status_code, headers=headers)
