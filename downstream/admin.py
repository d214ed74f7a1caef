"""Test and demo controls of the reference services: health, faults, reset, effects, answers.

`/_effects` and `/_operations/{key}` let tests prove "at most once" and let the orchestrator
reconcile an unknown outcome before re-sending. The fault board is in this process's
memory (the stores' state is in SQLite): mounted in each of `serve --workers N`'s processes,
a fault reaches only the one that took the POST.
"""

from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response, status

from downstream.deps import FaultsDep, StoreDep
from downstream.faults import DEFAULT_SECONDS, MAX_PENDING, Fault
from downstream.schemas import Detail, FaultRequest, ValidationDetail

router = APIRouter(tags=["admin"])

ONE_PROCESS = (
    " The board is this process's own, in memory: under `serve --workers N` (N > 1) each"
    " worker has its own, so for fault injection run `order-saga services` in its own"
    " process and point the service URLs at it."
)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.post(
    "/_faults",
    status_code=status.HTTP_201_CREATED,
    description="Queue a fault for the next `count` calls of `operation`." + ONE_PROCESS,
    responses={
        409: {"model": Detail, "description": f"{MAX_PENDING} faults are already pending"},
        422: {"model": ValidationDetail, "description": "not a valid fault"},
    },
)
async def add_fault(body: FaultRequest, faults: FaultsDep) -> dict[str, Any]:
    seconds = DEFAULT_SECONDS[body.mode] if body.seconds is None else body.seconds
    added = faults.add(Fault(body.operation, body.mode, body.count, seconds))
    if added is None:
        raise HTTPException(status.HTTP_409_CONFLICT, f"{MAX_PENDING} faults are already pending")
    return added.as_dict()


@router.get("/_faults", description="The pending faults." + ONE_PROCESS)
async def list_faults(faults: FaultsDep) -> dict[str, list[dict[str, Any]]]:
    return {"faults": [fault.as_dict() for fault in faults.pending()]}


@router.delete(
    "/_faults",
    status_code=status.HTTP_204_NO_CONTENT,
    description="Clear the pending faults." + ONE_PROCESS,
)
async def clear_faults(faults: FaultsDep) -> Response:
    faults.clear()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/_reset", status_code=status.HTTP_204_NO_CONTENT)
async def reset(store: StoreDep, faults: FaultsDep, request: Request) -> Response:
    faults.reset()
    store.reset()
    request.app.state.sink.reset()  # the event sink's record (downstream/sink.py)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/_effects")
async def effects(store: StoreDep) -> dict[str, dict[str, int]]:
    return {"effects": store.effects()}


@router.get(
    "/_operations/{key:path}",
    responses={404: {"model": Detail, "description": "no request with this key"}},
)
async def stored_answer(key: str, store: StoreDep) -> dict[str, Any]:
    answer = store.stored_answer(key)
    if answer is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no request with idempotency key {key}")
    return answer
