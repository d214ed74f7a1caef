"""Test and demo controls of the reference services: health, faults, reset, effects, answers.

`/_effects` and `/_operations/{key}` let tests prove "at most once" and let the orchestrator
reconcile an unknown outcome before re-sending.
"""

from typing import Any

from fastapi import APIRouter, HTTPException, Response, status

from downstream.deps import FaultsDep, StoreDep
from downstream.faults import DEFAULT_SECONDS, Fault
from downstream.schemas import FaultRequest

router = APIRouter(tags=["admin"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.post("/_faults", status_code=status.HTTP_201_CREATED)
async def add_fault(body: FaultRequest, faults: FaultsDep) -> dict[str, Any]:
    seconds = DEFAULT_SECONDS[body.mode] if body.seconds is None else body.seconds
    return faults.add(Fault(body.operation, body.mode, body.count, seconds)).as_dict()


@router.get("/_faults")
async def list_faults(faults: FaultsDep) -> dict[str, list[dict[str, Any]]]:
    return {"faults": [fault.as_dict() for fault in faults.pending()]}


@router.delete("/_faults", status_code=status.HTTP_204_NO_CONTENT)
async def clear_faults(faults: FaultsDep) -> Response:
    faults.clear()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/_reset", status_code=status.HTTP_204_NO_CONTENT)
async def reset(store: StoreDep, faults: FaultsDep) -> Response:
    faults.clear()
    store.reset()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/_effects")
async def effects(store: StoreDep) -> dict[str, dict[str, int]]:
    return {"effects": store.effects()}


@router.get("/_operations/{key:path}")
async def stored_answer(key: str, store: StoreDep) -> dict[str, Any]:
    answer = store.stored_answer(key)
    if answer is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no request with idempotency key {key}")
    return answer
