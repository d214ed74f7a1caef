"""`POST /orders/{id}/resolve`: the operator's "mark resolved" over HTTP (the /ui page and
`order-saga orders resolve` do the same through `fsm.operator`). HTTP <-> that call only.
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from api.deps import PrincipalDep, StoreDep
from api.schemas import OrderOut, problems
from fsm import operator
from fsm.executor import new_owner
from fsm.machine import OperatorAction

router = APIRouter(prefix="/orders", tags=["orders"])


class ResolveIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"reason": "refunded by hand, ticket OPS-42"}]},
    )

    reason: Annotated[str, Field(min_length=1, max_length=1000, pattern=r"\S")]
    # No `operator` member: who resolved is the caller (its key, token or session), never
    # a name the body gives (extra="forbid": a body naming one is a 422).


@router.post(
    "/{order_id}/resolve",
    response_model=OrderOut,
    responses=problems(404, 409, 500),
)
async def resolve_order(
    order_id: uuid.UUID, body: ResolveIn, store: StoreDep, principal: PrincipalDep
) -> OrderOut:
    """End a parked (`needs_attention`) order an operator fixed by hand: the declared edge
    needs_attention -resolve-> resolved, with the reason kept in the transition log and
    both the transition and an audit row naming the caller's key. Nothing downstream is
    called. An order resolved already: 200 with it as it is, nothing written (idempotent).
    409 unless the order is parked (or resolved) and nobody drives it."""
    audit = operator.Audit(OperatorAction.RESOLVE, principal.audit, body.reason)
    resolved = await operator.resolve(
        store,
        order_id,
        reason=body.reason,
        owner=new_owner(),
        operator=principal.name,
        audit=audit,
    )
    return OrderOut.of(resolved.order)
