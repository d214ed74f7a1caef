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
from starlette._utils import is_async_callable
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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


class Shortcut:
    """Pure ASGI, just inside the request-id middleware: a request whose method and path are
    exactly a direct route's (no path parameters) goes to that route's reader without
    FastAPI's exception middleware, exit stacks, router match and route wrappers, ~10
    Python frames and an `AsyncExitStack` per request (`POST /orders`: once per order).

    What the reader declines, and every other request, goes down the normal stack, the body
    replayed. An exception from the endpoint goes to the app's handler for it, looked up
    as Starlette's `ExceptionMiddleware` does (the catch-all `Exception` handler stays the
    outermost `ServerErrorMiddleware`'s: re-raised to it). A request under a root path or
    observed by FastAPI's native telemetry (the span names its route) takes the normal
    stack too."""

    def __init__(self, app: ASGIApp, *, routes: list[BaseRoute]) -> None:
        self.app = app
        self.readers: dict[tuple[str, str], Reader] = {}
        for route in routes:
            if not isinstance(route, DirectRoute) or "{" in route.path:
                continue
            reader = _READERS.get(route.endpoint)
            if reader is None:
                continue
            for method in route.methods or ():
                self.readers[(method, route.path)] = reader

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        reader = (
            self.readers.get((scope["method"], scope["path"]))
            if scope["type"] == "http"
            and not scope.get("root_path")
            and "fastapi.telemetry" not in scope
            else None
        )
        if reader is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            response = await reader(request)
        except Exception as exc:
            response = await _handled(request, exc)
        if response is None:  # declined: FastAPI's own handling, the body replayed
            body = await request.body()
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if replayed:
                    return await receive()
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}

            await self.app(scope, replay, send)
            return
        await response(scope, receive, send)


async def _handled(request: Request, exc: Exception) -> Response:
    """The response of the app's handler for `exc` (re-raised if it has none but the
    catch-all), as `ExceptionMiddleware` would give it."""
    handlers = request.app.exception_handlers
    handler = None
    if isinstance(exc, HTTPException) and exc.status_code != 500:
        handler = handlers.get(exc.status_code)
    if handler is None:
        for cls in type(exc).__mro__:
            if cls is Exception:
                break  # the outermost ServerErrorMiddleware's (logged, 500)
            handler = handlers.get(cls)
            if handler is not None:
                break
    if handler is None:
        raise exc
    if is_async_callable(handler):
        response: Response = await handler(request, exc)
    else:
        response = await run_in_threadpool(handler, request, exc)
    exc.__traceback__ = None  # as Starlette: a reused exception would keep its frames
    return response
