"""HTTP <-> `fsm.diagram`: the state diagram of the whole machine, or of one order with its
path highlighted, as svg (default), png, mermaid or dot. No drawing logic here.

Graphviz is a subprocess that takes a noticeable time per picture: renderings run in
worker threads behind their own limiter (`ORDER_SAGA_DIAGRAM_CONCURRENCY`), never on the
event loop nor in the threadpool the other routes share, and an order's picture is cached
by (order, last transition seq, format): a new transition makes a new key.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from api.deps import PrincipalDep, StoreDep, visible
from fsm.diagram import CONTENT_TYPES, Format, render
from fsm.models import Transition

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
    503: {
        "description": "Graphviz is not installed (svg, png): code graphviz_missing, no "
        "Retry-After; or the database is unavailable (Retry-After)."
    },
}
CacheKey = tuple[uuid.UUID | None, int, str]  # (order, last transition seq, format)
Draw = Callable[[str, Sequence[Transition] | None], bytes]


class Renderer:
    """Renders off the loop, at most `concurrency` at once, remembering recent pictures."""

    def __init__(self, concurrency: int, size: int = 256, draw: Draw = render) -> None:
        self.concurrency = concurrency
        self.size = size
        self.draw = draw
        self._limiter: anyio.CapacityLimiter | None = None
        self._cache: OrderedDict[CacheKey, bytes] = OrderedDict()

    async def render(self, key: CacheKey, fmt: str, history: Sequence[Transition] | None) -> bytes:
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        if self._limiter is None:  # created inside the running loop
            self._limiter = anyio.CapacityLimiter(self.concurrency)
        # GraphvizMissing: the app's 503 problem, code graphviz_missing
        body = await anyio.to_thread.run_sync(self.draw, fmt, history, limiter=self._limiter)
        self._cache[key] = body
        while len(self._cache) > self.size:
            self._cache.popitem(last=False)
        return body


def _respond(body: bytes, fmt: Format) -> Response:
    return Response(content=body, media_type=CONTENT_TYPES[fmt])


def _renderer(request: Request) -> Renderer:
    state = request.app.state
    if getattr(state, "diagrams", None) is None:  # an app that only includes this router
        state.diagrams = Renderer(concurrency=2)
    renderer: Renderer = state.diagrams
    return renderer


@router.get("/diagram", response_class=Response, responses=_RESPONSES)
async def machine_diagram(request: Request, fmt: FormatQuery = "svg") -> Response:
    """Every state and declared transition of the order and step machines."""
    return _respond(await _renderer(request).render((None, 0, fmt), fmt, None), fmt)


@router.get(
    "/orders/{order_id}/diagram",
    response_class=Response,
    responses={**_RESPONSES, 404: {"description": "No such order: code order_not_found."}},
)
async def order_diagram(
    request: Request,
    order_id: uuid.UUID,
    store: StoreDep,
    principal: PrincipalDep,
    fmt: FormatQuery = "svg",
) -> Response:
    """The machine with this order's path (from its transition log) and current state(s)
    highlighted."""
    await run_in_threadpool(visible, store, order_id, principal)  # OrderNotFound: 404
    history = await run_in_threadpool(store.history, order_id)
    last = history[-1].seq if history else 0
    body = await _renderer(request).render((order_id, last, fmt), fmt, history)
    return _respond(body, fmt)
