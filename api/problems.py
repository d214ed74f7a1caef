"""One error -> HTTP mapping for the whole API, answered as RFC 9457 problem details.

Every error answer is `application/problem+json`: `type` (`about:blank`), `title` (the
status phrase), `status`, `detail`, plus `code` (a stable machine-readable name) and, for
validation errors, `errors` (where, what, and at most a short excerpt of the input, never
the input itself: a NaN or a lone surrogate cannot be echoed as JSON, a 64 KiB body should
not be). The one exception is the 404 of `POST /orders` for a missing product: its body is
the rejected order itself (its `status` member is the order's, not RFC 9457's).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from fsm.diagram import GraphvizMissing
from fsm.errors import (
    CircuitOpen,
    ConcurrencyError,
    CorruptOrder,
    InvalidMove,
    OrderNotFound,
    SagaError,
    StoreUnavailable,
)

log = logging.getLogger("order_saga.api")

MEDIA_TYPE = "application/problem+json"
RETRY_AFTER = "5"  # seconds: a database restart or failover usually takes about this long
EXCERPT = 40  # characters of a bad input echoed back, at most

# The saga's errors, most specific first (looked up along the exception's MRO).
SAGA_STATUS: Mapping[type[SagaError], int] = {
    OrderNotFound: 404,
    ConcurrencyError: 409,
    InvalidMove: 409,
    CorruptOrder: 500,
    StoreUnavailable: 503,
}


class ValidationIssue(BaseModel):
    loc: list[str | int] = Field(description="where: body, query, header or path, then field")
    msg: str
    type: str = Field(description="pydantic error type, or a code of ours")
    input: str | None = Field(default=None, description=f"at most {EXCERPT} characters of it")


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    code: str | None = Field(default=None, description="stable name of the error")
    errors: list[ValidationIssue] | None = None


def excerpt(value: Any) -> str | None:
    """A short, always-encodable rendering of a bad input (lone surrogates escaped)."""
    if value is None or isinstance(value, dict | list):
        return None  # the whole body or a container: the `loc` says where, that is enough
    text = value if isinstance(value, str) else repr(value)
    if len(text) > EXCERPT:
        text = text[:EXCERPT] + "…"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def problem(
    status: int,
    detail: str,
    *,
    code: str | None = None,
    errors: Sequence[ValidationIssue] | None = None,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body = Problem(
        title=HTTPStatus(status).phrase,
        status=status,
        detail=detail,
        code=code,
        errors=list(errors) if errors is not None else None,
    ).model_dump(exclude_none=True)
    return JSONResponse(
        {**body, **extra}, status_code=status, headers=dict(headers or {}), media_type=MEDIA_TYPE
    )


def issues(errors: Sequence[Any]) -> list[ValidationIssue]:
    """pydantic/FastAPI error dicts -> what we send back (no ctx, no full input)."""
    return [
        ValidationIssue(
            loc=[p if isinstance(p, int) else str(p) for p in e.get("loc", ())],
            msg=str(e.get("msg", "invalid")),
            type=str(e.get("type", "value_error")),
            input=excerpt(e.get("input")),
        )
        for e in errors
    ]


def invalid(errors: Sequence[Any], code: str = "invalid_request") -> JSONResponse:
    found = issues(errors)
    first = found[0] if found else None
    where = ".".join(str(p) for p in first.loc) if first else "request"
    detail = f"{where}: {first.msg}" if first else "invalid request"
    return problem(422, detail, code=code, errors=found)


def unavailable(
    what: str, detail: str | None = None, retry_after: str = RETRY_AFTER
) -> JSONResponse:
    return problem(
        503,
        detail or f"{what} is unavailable, try again later",
        code="store_unavailable",
        headers={"Retry-After": retry_after},
        dependency=what,
    )


def is_unavailable(exc: BaseException) -> bool:
    """The database (or its connection) is gone, as opposed to a bug in a statement."""
    if isinstance(exc, StoreUnavailable | OperationalError | InterfaceError | PoolTimeout):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def saga_status(exc: SagaError) -> int:
    for cls in type(exc).__mro__:
        if cls in SAGA_STATUS:
            return SAGA_STATUS[cls]
    return 500


METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(app: FastAPI, scope: Any) -> str:
    """Every method some route of this path answers, HEAD wherever GET (`api.head`).
    Starlette's 405 names only the methods of the first route that matched the path (GET
    /orders and POST /orders are two routes, so OPTIONS /orders said `Allow: POST`)."""
    return ", ".join(
        method
        for method in METHODS
        if any(
            route.matches({**scope, "method": "GET" if method == "HEAD" else method})[0]
            is Match.FULL
            for route in app.router.routes
        )
    )


def install(app: FastAPI) -> None:
    """Register the mapping on `app`: every error answer below goes through `problem()`."""

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        code = "unauthorized" if exc.status_code == 401 else None
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = allowed_methods(app, request.scope)
        return problem(exc.status_code, detail, code=code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return invalid(exc.errors())

    @app.exception_handler(SagaError)
    async def _saga(_: Request, exc: SagaError) -> JSONResponse:
        if isinstance(exc, CircuitOpen):  # the service is known down: no call was made
            seconds = str(max(1, math.ceil(exc.retry_after)))
            return problem(
                503, str(exc), code=exc.code, headers={"Retry-After": seconds},
                dependency=exc.service,
            )  # fmt: skip
        if isinstance(exc, StoreUnavailable):  # a lock or statement timeout, or the server
            # gone; nothing was decided, a retry soon may succeed. The driver's words (host,
            # port) go to the log; the caller is told what kind (`public`).
            log.warning("%s", exc)
            return unavailable("database", f"{exc.public}, try again later", retry_after="1")
        return problem(saga_status(exc), str(exc), code=exc.code)

    @app.exception_handler(DBAPIError)
    async def _database(_: Request, exc: DBAPIError) -> JSONResponse:
        if is_unavailable(exc):
            log.warning("database unavailable: %s", type(exc.orig).__name__)
            return unavailable("database")
        raise exc  # a bug, not an outage: the generic 500 below, with its traceback logged

    @app.exception_handler(PoolTimeout)
    async def _pool(_: Request, exc: PoolTimeout) -> JSONResponse:
        return unavailable("database")

    @app.exception_handler(GraphvizMissing)
    async def _graphviz(_: Request, exc: GraphvizMissing) -> JSONResponse:
        return problem(503, str(exc), code="graphviz_missing")

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        return problem(500, "internal error (logged on the server)", code="internal")
