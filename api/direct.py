"""`DirectRoute`: a route whose well-formed request skips FastAPI's parameter solving.

FastAPI reads every parameter of a route through its dependency solver (each header, the
body, every dependency), several dozen Python calls per request: a visible part of
`serve`'s CPU per order (BENCHMARKS.md, "serve's and the services' CPU per order"). A
route of this class may have a direct reader (`direct.register`): it takes the
parameters straight from the request, validated by the same pydantic model and the same
bounds, and calls the endpoint itself. It declines (None) whatever it is not sure of, and
FastAPI's own handler then serves the request, so every 422, the OpenAPI and the endpoint's
code stay FastAPI's. Exceptions the endpoint raises go to the same exception handlers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from fastapi.routing import APIRoute

Reader = Callable[[Request], Awaitable[Response | None]]
_READERS: dict[Callable[..., Any], Reader] = {}


def register(endpoint: Callable[..., Any], reader: Reader) -> None:
    """Serve `endpoint`'s well-formed requests through `reader` (None: FastAPI's way)."""
    _READERS[endpoint] = reader


class DirectRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        checked = super().get_route_handler()
        endpoint = self.endpoint

        async def handler(request: Request) -> Response:
            reader = _READERS.get(endpoint)  # looked up here: registered after the route
            if reader is not None and (response := await reader(request)) is not None:
                return response
            return await checked(request)

        return handler
