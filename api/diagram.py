"""HTTP <-> `fsm.diagram`: the state diagram of the whole machine, or of one order with its
path highlighted, as svg (default), png, mermaid or dot. No drawing logic here.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Response, status

from api.deps import StoreDep
from fsm.diagram import CONTENT_TYPES, Format, GraphvizMissing, render, render_for_order
from fsm.errors import OrderNotFound

router = APIRouter(tags=["diagram"])

FormatQuery = Annotated[
    Format, Query(alias="format", description="svg and png need Graphviz on the server")
]
_EXAMPLES = {
    "mermaid": "stateDiagram-v2\n    [*] --> pending\n",
    "svg": '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 1000 1400">…</svg>',
}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {
            ctype: {"example": _EXAMPLES[fmt]} if fmt in _EXAMPLES else {}
            for fmt, ctype in CONTENT_TYPES.items()
        },
        "description": "The diagram in the requested format.",
    },
    503: {"description": "Graphviz is not installed (svg, png)."},
}


def _respond(body: bytes, fmt: Format) -> Response:
    return Response(content=body, media_type=CONTENT_TYPES[fmt])


@router.get("/diagram", response_class=Response, responses=_RESPONSES)
def machine_diagram(fmt: FormatQuery = "svg") -> Response:
    """Every state and declared transition of the order and step machines."""
    try:
        return _respond(render(fmt), fmt)
    except GraphvizMissing as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=str(exc)) from exc


@router.get(
    "/orders/{order_id}/diagram",
    response_class=Response,
    responses={**_RESPONSES, 404: {"description": "No such order."}},
)
def order_diagram(order_id: uuid.UUID, store: StoreDep, fmt: FormatQuery = "svg") -> Response:
    """The machine with this order's path (from its transition log) and current state(s)
    highlighted."""
    try:
        return _respond(render_for_order(store, order_id, fmt), fmt)
    except OrderNotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=str(exc)) from exc
    except GraphvizMissing as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=str(exc)) from exc
