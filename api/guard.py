"""ASGI middleware at the edge of the process, in front of every route and every mount.

Who may call what is `api.auth.AuthGate` (issue 17), outermost of all.

`BodyGuard`: bodies are capped before anything reads them (413), a body sent to the JSON
API must be declared JSON (415; the console's forms under `/ui/` excepted), and a JSON body
must be strict JSON before any handler parses it (422): UTF-8 (a body declared in another
charset: 415), no NaN/Infinity/overflowing numbers, no lone surrogates, no duplicate keys.
Python's `json` accepts all of those, and a handler would otherwise act on the last
duplicate or fail to echo the value back.

Server side only: the client side of the bearer (our token on calls to our own embedded
services) is `fsm.wiring`'s, where every service client is built.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterable
from typing import Any

from fastapi.routing import APIRoute
from starlette.datastructures import Headers
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.problems import ValidationIssue, excerpt, problem

JSON_METHODS = frozenset({"POST", "PUT", "PATCH"})
FORM_PREFIXES = ("/ui/",)  # the console posts HTML forms; every other body is JSON


class BadJSON(ValueError):
    pass


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise BadJSON(f"duplicate key {excerpt(key)!r}")
        seen.add(key)
    return dict(pairs)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadJSON(f"number out of range: {excerpt(text)}")
    return value


def _constant(name: str) -> Any:
    raise BadJSON(f"{name} is not JSON")


def _check_strings(document: Any) -> None:
    stack = [document]  # iterative: nesting depth is bounded by the body cap only
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise BadJSON("a string holds a lone surrogate (\\ud800-\\udfff)") from None
        elif isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)


def strict_json(body: bytes) -> None:
    """Raise `BadJSON` unless `body` is JSON that every consumer reads the same way."""
    try:
        text = body.decode("utf-8")
        document = json.loads(
            text, object_pairs_hook=_pairs, parse_float=_finite, parse_constant=_constant
        )
    except BadJSON:
        raise
    except UnicodeDecodeError:
        raise BadJSON("the body is not UTF-8") from None
    except RecursionError:
        raise BadJSON("the body is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, or an integer of thousands of digits
        raise BadJSON(f"invalid JSON: {str(exc).splitlines()[0][:80]}") from None
    _check_strings(document)


def _foreign_charset(content_type: str | None) -> str | None:
    """The charset a JSON body declares, if it is not UTF-8 (RFC 8259 §8.1: JSON exchanged
    between systems is UTF-8; a body declared otherwise would be misread, not converted)."""
    for parameter in (content_type or "").split(";")[1:]:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset":
            charset = value.strip().strip('"').lower()
            if charset not in ("utf-8", "utf8"):
                return charset
    return None


def _is_json(content_type: str | None) -> bool:
    # What FastAPI parses as JSON (strict_content_type, its default): a body declared
    # JSON; one with no content type is not, it reaches the route as bytes.
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


class BodyGuard:
    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        read_timeout: float = 10.0,
        form_prefixes: tuple[str, ...] = FORM_PREFIXES,
        routes: Iterable[BaseRoute] = (),
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout = read_timeout
        self.form_prefixes = form_prefixes
        # The app's own routes that take no body (a resume, a cancel: `reason` is a query
        # parameter): a body sent there is ignored, as it always was, not refused with a
        # 415 asking for JSON that would be ignored too.
        self.bodiless = tuple(
            (frozenset(route.methods or ()), route.path_regex)
            for route in routes
            if isinstance(route, APIRoute) and route.body_field is None and route.methods
        )

    def _takes_no_body(self, scope: Scope) -> bool:
        method, path = scope["method"], scope["path"]
        return any(method in methods and regex.match(path) for methods, regex in self.bodiless)

    def _too_large(self) -> Any:
        return problem(
            413, f"the body is larger than {self.max_bytes} bytes", code="body_too_large"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large()(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        # asyncio's own timeout: half the CPU of anyio's cancel scope, once per request
        deadline = asyncio.timeout(self.read_timeout)
        try:
            async with deadline:  # a body sent byte by byte
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return  # the client is gone: nothing to answer
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_bytes:
                        break
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            if not deadline.expired():
                raise  # not ours
            timeout = problem(408, "the body took too long to arrive", code="body_timeout")
            await timeout(scope, receive, send)
            return
        if size > self.max_bytes:
            await self._too_large()(scope, receive, send)
            return
        body = b"".join(chunks)
        content_type = headers.get("content-type")
        json_body = _is_json(content_type)
        if (
            body
            and not json_body
            and scope["method"] in JSON_METHODS
            and not scope["path"].startswith(self.form_prefixes)
            and not self._takes_no_body(scope)
        ):  # a form or text/plain would fail FastAPI's validation as "not a dictionary"
            media = excerpt((content_type or "").split(";", 1)[0].strip()) or "none"
            unsupported = problem(
                415,
                f"send Content-Type: application/json (not {media})",
                code="unsupported_media_type",
            )
            await unsupported(scope, receive, send)
            return
        if body and scope["method"] in JSON_METHODS and json_body:
            charset = _foreign_charset(content_type)
            if charset is not None:
                unsupported = problem(
                    415,
                    f"a JSON body must be UTF-8, not charset={excerpt(charset)}",
                    code="unsupported_charset",
                )
                await unsupported(scope, receive, send)
                return
            try:
                strict_json(body)
            except BadJSON as exc:
                response = problem(
                    422,
                    f"body: {exc}",
                    code="invalid_json",
                    errors=[ValidationIssue(loc=["body"], msg=str(exc), type="json_invalid")],
                )
                await response(scope, receive, send)
                return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: wait for the disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)
