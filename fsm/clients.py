"""One Protocol per downstream service and its HTTP implementation over one client layer.

Every answer is classified here, once, into the three outcomes of SPEC §2: a returned
dict (2xx), `BusinessFailure` (a definite 4xx "no") or `TransientFailure` (5xx, timeout,
connection error, unreadable body -- not JSON, or NaN/Infinity in it: the effect may or
may not have happened). A body is read to at most 1 MiB decoded (`fsm.body`); a lone
surrogate or a NUL in an answer's strings (a service that cut a string mid-emoji) becomes
U+FFFD here, and an error's text (detail, reason phrase) is made storable
(`fsm.text.storable`: one line, capped): no such value reaches the engine, which could
neither store nor serve it.

The calls go out through a `Transport`: `AiohttpTransport` (aiohttp's pool directly, what
`fsm.wiring` builds: one client layer, the cheapest per call, BENCHMARKS.md "The HTTP
path, issue 20") or `HttpxTransport` (an httpx client, e.g. on an in-process ASGI
transport). This module does not decide timeouts or pool sizes (`fsm.wiring` does), and
never lets a transport library's own exception out.
"""

from __future__ import annotations

import json as jsonlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Protocol

from fsm.body import ACCEPTED_ENCODINGS, MAX_BODY, Body
from fsm.errors import BusinessFailure, NotFound, TransientFailure
from fsm.text import storable

if TYPE_CHECKING:  # each transport imports its library: a command that calls no service
    import aiohttp  # (`orders list`, `keys`, ...) imports neither (~150 ms a process)
    import httpx

Answer = dict[str, Any]

# 4xx codes that mean "try again later", not "no".
_RETRYABLE_4XX = {408, 425, 429}

# `json.loads` lets lone surrogates through, as `\ud800` escapes or as their (invalid)
# UTF-8 bytes, and NUL as `\u0000` (which no PostgreSQL text column takes). Only a body
# holding either is walked: one C-speed scan, no re-encoding.
_MAYBE_SURROGATE = re.compile(rb"\\u[dD][89abcdefABCDEF]|\xed[\xa0-\xbf]|\\u0000")
_SURROGATE = re.compile("[\x00\ud800-\udfff]")


class ReconcilingService(Protocol):
    async def lookup(self, key: str) -> Answer | None:
        """The stored answer for an idempotency key, or None if the service never saw it."""


class ProductService(Protocol):
    async def get(self, product_id: int) -> Answer: ...


class UserService(ReconcilingService, Protocol):
    async def deduct(self, *, user_id: int, amount: int, order_id: str, key: str) -> Answer: ...
    async def refund(self, *, user_id: int, amount: int, order_id: str, key: str) -> Answer: ...


class InventoryService(ReconcilingService, Protocol):
    async def deduct(
        self, *, product_id: int, quantity: int, order_id: str, key: str
    ) -> Answer: ...
    async def restore(
        self, *, product_id: int, quantity: int, order_id: str, key: str
    ) -> Answer: ...


class ShippingService(ReconcilingService, Protocol):
    async def schedule(self, *, order_id: str, user_id: int, quantity: int, key: str) -> Answer: ...
    async def cancel(self, *, order_id: str, key: str) -> Answer: ...


@dataclass(frozen=True)
class Reply:
    """An answer as it came off the wire: status, reason phrase, raw body."""

    status: int
    reason: str
    body: bytes


class Transport(Protocol):
    async def request(self, method: str, url: str, *, body: Any, headers: dict[str, str]) -> Reply:
        """Send `body` as JSON (None: no body). Raises only `TransientFailure` (its
        message says what went wrong; the caller adds the method and path)."""


class AiohttpTransport:
    """aiohttp's session and pool, used directly. `sign`, when set, may add headers to
    each request given its URL (`fsm.wiring.BearerFor`: our token on calls to our own
    embedded services only). Use as an async context manager (the session is made on the
    running loop)."""

    def __init__(self, *, timeout: float, max_connections: int) -> None:
        import aiohttp

        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.max_connections = max_connections
        self.session: aiohttp.ClientSession | None = None
        self.sign: Callable[[str, dict[str, str]], None] | None = None

    async def __aenter__(self) -> AiohttpTransport:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=0)
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=self.timeout,
            cookie_jar=aiohttp.DummyCookieJar(),  # services set none; skip the jar's work
            # The body is decoded by fsm.body, bounded, not by aiohttp (which inflates a
            # whole chunk at once: 30 KB of gzip made 30 MB).
            auto_decompress=False,
            headers={"Accept-Encoding": ACCEPTED_ENCODINGS},
            json_serialize=jsonlib.dumps,
        )
        return self

    async def __aexit__(self, *_: object) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def request(self, method: str, url: str, *, body: Any, headers: dict[str, str]) -> Reply:
        import aiohttp  # imported by __init__: a lookup in sys.modules

        assert self.session is not None, "use AiohttpTransport as an async context manager"
        if self.sign is not None:
            self.sign(url, headers)
        try:
            # A redirect is never followed (aiohttp would re-send a POST as a GET and take
            # the page it lands on for the answer): a 3xx is an unknown outcome, as a 5xx.
            request = self.session.request(
                method, url, json=body, headers=headers, allow_redirects=False
            )
            async with request as r:
                encoding, length = r.headers.get("Content-Encoding", ""), r.content_length
                if not encoding and length is not None and length <= MAX_BODY:
                    return Reply(r.status, r.reason or "", await r.read())  # the usual answer
                answer = Body(encoding)
                async for chunk in r.content.iter_any():
                    answer.feed(chunk)
                    if answer.too_large:
                        break
                return _reply(r.status, r.reason or "", answer)
        except TimeoutError as exc:
            raise TransientFailure(f"timed out ({type(exc).__name__})") from exc
        except (aiohttp.ClientError, ValueError, OSError) as exc:
            # ClientError: refused, reset, disconnected, malformed or cut-short answers.
            raise TransientFailure(f"{type(exc).__name__}: {exc}") from exc


class HttpxTransport:
    """An httpx client as the transport (an in-process ASGI app, say). Redirects are not
    followed, whatever the client's setting (as `AiohttpTransport`)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def request(self, method: str, url: str, *, body: Any, headers: dict[str, str]) -> Reply:
        import httpx  # its client's library: imported already

        headers = {**headers, "Accept-Encoding": ACCEPTED_ENCODINGS}
        request = self.client.build_request(method, url, json=body, headers=headers)
        try:
            r = await self.client.send(request, stream=True, follow_redirects=False)
            try:
                if r.is_stream_consumed:  # made in process (a MockTransport's): in memory
                    answer = Body("")
                    answer.feed(r.content)
                else:  # the raw bytes, decoded and bounded by fsm.body as aiohttp's are
                    answer = Body(r.headers.get("Content-Encoding", ""))
                    async for chunk in r.aiter_raw():
                        answer.feed(chunk)
                        if answer.too_large:
                            break
            finally:
                await r.aclose()
        except httpx.TimeoutException as exc:
            raise TransientFailure(f"timed out ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
            # TransportError: refused, reset, malformed; StreamError: a stream misused.
            raise TransientFailure(f"{type(exc).__name__}: {exc}") from exc
        return _reply(r.status_code, r.reason_phrase, answer)


def _reply(status: int, reason: str, answer: Body) -> Reply:
    """A body past the bound is no answer: a 2xx unreadable, any other status classified
    by itself (a 402 with a 2 MB body is still a "no")."""
    if answer.too_large and 200 <= status < 300:
        raise TransientFailure(f"{status} {reason}: unreadable body: larger than {MAX_BODY} bytes")
    return Reply(status, reason, bytes(answer.data))


class HttpService:
    """Shared request + classification logic for one service's base URL."""

    def __init__(self, transport: Transport | httpx.AsyncClient, base_url: str) -> None:
        if not isinstance(transport, AiohttpTransport):  # (the engine's: no httpx import)
            import httpx

            if isinstance(transport, httpx.AsyncClient):
                transport = HttpxTransport(transport)
        self.transport = transport
        self.base_url = base_url.rstrip("/")

    async def send(
        self, method: str, path: str, *, json: Any = None, key: str | None = None
    ) -> Answer:
        headers = {"Idempotency-Key": key} if key else {}
        url = f"{self.base_url}{path}"
        try:
            reply = await self.transport.request(method, url, body=json, headers=headers)
        except TransientFailure as exc:  # the transport's, which does not know the path
            raise TransientFailure(storable(f"{method} {path}: {exc}")) from exc
        return classify(method, path, reply.status, reply.reason, _parse(reply.body))

    async def lookup(self, key: str) -> Answer | None:
        """Reconcile: ask what happened to `key`. The stored answer is replayed through the
        same classification, so a stored 402 raises BusinessFailure as the original did.
        Only that replay may say "no": the GET itself refused (401/403 from a gateway, 400,
        405) says nothing about the key, so the outcome stays unknown (TransientFailure)."""
        try:
            stored = await self.send("GET", f"/_operations/{key}")
        except NotFound:
            return None
        except BusinessFailure as exc:
            raise TransientFailure(
                f"{exc}: the lookup was refused, outcome unknown", status=exc.status, body=exc.body
            ) from exc
        status = stored.get("status_code")
        if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
            raise TransientFailure(f"GET /_operations/{key}: no valid status_code in the answer")
        return classify("replay", key, status, _phrase(status), stored.get("body"))


def _finite(literal: str) -> float:
    number = float(literal)
    if not math.isfinite(number):  # 1e999
        raise ValueError(f"number out of range: {literal[:20]}")
    return number


def _no_constant(literal: str) -> Any:
    raise ValueError(f"not a JSON number: {literal}")


# How deeply an answer may nest arrays and objects. Real answers nest two or three levels;
# at 600 (1.2 KB) the stored log could no longer be served (pydantic's serializer refuses
# it), and far deeper the parser itself runs out of stack (RecursionError).
MAX_DEPTH = 64

# Strict JSON numbers: NaN, Infinity (Python's json.dumps writes them) and a float that
# overflows could not be stored (PostgreSQL's json type refuses them) nor served.
_DECODER = jsonlib.JSONDecoder(parse_float=_finite, parse_constant=_no_constant)


def _parse(body: bytes) -> Any:
    """The answer's JSON, or None if unreadable (not JSON, or not storable: NaN, Infinity,
    a float out of range, nested deeper than MAX_DEPTH). Lone surrogates and NUL in its
    strings become U+FFFD."""
    try:
        # As json.loads reads bytes (UTF-8/16/32; a surrogate's bytes kept, then replaced).
        text = body.decode(jsonlib.detect_encoding(body), "surrogatepass")
        document = _DECODER.decode(text)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError too
        return None
    # Only a body with that many brackets can be that deep: one C-speed count each.
    if body.count(b"[") + body.count(b"{") > MAX_DEPTH and _deeper(document, MAX_DEPTH):
        return None
    return _readable(document) if _MAYBE_SURROGATE.search(body) else document


def _deeper(value: Any, levels: int) -> bool:
    """Whether `value` nests more than `levels` arrays/objects (walks at most that far)."""
    if isinstance(value, dict):
        children: Any = value.values()
    elif isinstance(value, list):
        children = value
    else:
        return False
    return levels == 0 or any(_deeper(child, levels - 1) for child in children)


def _readable(value: Any) -> Any:
    """`value` with each lone surrogate and NUL replaced by U+FFFD (a valid pair was
    already joined by the parser), so every string of an answer encodes as UTF-8 and fits
    a text column."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {_readable(key): _readable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_readable(item) for item in value]
    return value


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def classify(method: str, path: str, status: int, reason: str, body: Any) -> Answer:
    """The answer as SPEC §2's outcomes: 2xx a success (a JSON object, else unreadable), 404
    NotFound, another 4xx but 408/425/429 a business failure; anything else (5xx, a 3xx
    redirect that was not followed, 1xx) an unknown outcome, TransientFailure."""
    if 200 <= status < 300:
        if not isinstance(body, dict):
            raise TransientFailure(f"{method} {path}: unreadable body", status=status)
        return body
    message = body.get("detail") if isinstance(body, dict) else None
    # The one place an error's text is built from the answer: storable from here on.
    text = storable(f"{method} {path}: {status} {message or reason}")
    if status == 404:
        raise NotFound(text, status=status, body=body)
    if 400 <= status < 500 and status not in _RETRYABLE_4XX:
        raise BusinessFailure(text, status=status, body=body)
    raise TransientFailure(text, status=status, body=body)


class HttpProductService(HttpService):
    async def get(self, product_id: int) -> Answer:
        return await self.send("GET", f"/products/{product_id}")


class HttpUserService(HttpService):
    async def deduct(self, *, user_id: int, amount: int, order_id: str, key: str) -> Answer:
        body = {"user_id": user_id, "amount": amount, "order_id": order_id}
        return await self.send("POST", "/users/deduct", json=body, key=key)

    async def refund(self, *, user_id: int, amount: int, order_id: str, key: str) -> Answer:
        body = {"user_id": user_id, "amount": amount, "order_id": order_id}
        return await self.send("POST", "/users/refund", json=body, key=key)


class HttpInventoryService(HttpService):
    async def deduct(self, *, product_id: int, quantity: int, order_id: str, key: str) -> Answer:
        body = {"product_id": product_id, "quantity": quantity, "order_id": order_id}
        return await self.send("POST", "/inventory/deduct", json=body, key=key)

    async def restore(self, *, product_id: int, quantity: int, order_id: str, key: str) -> Answer:
        body = {"product_id": product_id, "quantity": quantity, "order_id": order_id}
        return await self.send("POST", "/inventory/restore", json=body, key=key)


class HttpShippingService(HttpService):
    async def schedule(self, *, order_id: str, user_id: int, quantity: int, key: str) -> Answer:
        body = {"order_id": order_id, "user_id": user_id, "quantity": quantity}
        return await self.send("POST", "/shipping/schedule", json=body, key=key)

    async def cancel(self, *, order_id: str, key: str) -> Answer:
        return await self.send("POST", "/shipping/cancel", json={"order_id": order_id}, key=key)


class Services:
    """The downstream clients the executor talks to, by service name: `product` and each
    step's (`fsm.registry.SERVICES`). `fsm.wiring` builds them from the settings."""

    def __init__(self, **clients: Any) -> None:
        self.clients: dict[str, Any] = clients

    @property
    def product(self) -> ProductService:
        client: ProductService = self["product"]
        return client

    def __getitem__(self, service: str) -> Any:
        try:
            return self.clients[service]
        except KeyError:
            raise KeyError(f"no client for the {service!r} service") from None
