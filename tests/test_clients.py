"""The service clients over a real socket, through the transport `open_saga` uses
(`fsm.wiring.http_client`): every way an answer can fail lands in one of SPEC §2's three
outcomes, never as a transport library's own exception (`HttpxTransport`, an httpx
client's, too)."""

from __future__ import annotations

import asyncio
import gzip
import json as jsonlib
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import httpx
import pytest

from fsm.body import MAX_BODY
from fsm.clients import MAX_DEPTH, Answer, HttpService
from fsm.errors import BusinessFailure, NotFound, TransientFailure
from fsm.settings import Settings
from fsm.text import MAX_ERROR_CHARS
from fsm.wiring import http_client

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[str]:
    """A TCP server on 127.0.0.1 answering each connection with `handler`; yields its URL.
    On exit every connection is closed and its handler finished."""
    handlers: set[asyncio.Task[None]] = set()

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await handler(reader, writer)
        except ConnectionError:
            pass  # the client hung up first
        finally:
            writer.close()

    server = await asyncio.start_server(connection, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with server:
            yield f"http://127.0.0.1:{port}"
    finally:
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)


def answering(raw: bytes) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(raw)
        await writer.drain()

    return handler


def http_answer(status: str, body: bytes) -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
    return f"{head}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    await reader.read()  # never answers: waits until the client gives up and hangs up


def deduct(service: HttpService) -> Awaitable[Answer | None]:
    return service.send("POST", "/users/deduct", json={}, key="k")


def lookup(service: HttpService) -> Awaitable[Answer | None]:
    return service.lookup("o-1:payment:deduct")


# Long enough for a mebibyte through a loaded CI machine (0.3 s timed out there); the one
# test of a silent server waits it out.
TIMEOUT = 2.0


async def call(
    base_url: str, what: Callable[[HttpService], Awaitable[Answer | None]] = deduct
) -> Answer | None:
    async with http_client(Settings(http_timeout=TIMEOUT)) as client:
        return await what(HttpService(client, base_url))


async def test_a_2xx_json_object_is_the_answer() -> None:
    async with raw_server(answering(http_answer("200 OK", b'{"ok": true}'))) as url:
        assert await call(url) == {"ok": True}


@pytest.mark.parametrize(
    ("status", "body", "outcome"),
    [
        pytest.param("402 Payment Required", b'{"detail": "poor"}', BusinessFailure, id="402-no"),
        pytest.param("404 Not Found", b'{"detail": "gone"}', NotFound, id="404-not-found"),
        pytest.param("429 Too Many Requests", b"{}", TransientFailure, id="429-later"),
        pytest.param("503 Service Unavailable", b"{}", TransientFailure, id="503"),
        pytest.param("200 OK", b"[1, 2]", TransientFailure, id="2xx-not-an-object"),
        pytest.param("200 OK", b"{not json", TransientFailure, id="2xx-unreadable"),
    ],
)
async def test_an_answer_is_classified(status: str, body: bytes, outcome: type[Exception]) -> None:
    async with raw_server(answering(http_answer(status, body))) as url:
        with pytest.raises(outcome):
            await call(url)


@pytest.mark.parametrize(
    "handler",
    [
        pytest.param(silent, id="no-answer-within-the-timeout"),
        pytest.param(answering(b"NOT HTTP AT ALL\r\n\r\n"), id="malformed-status-line"),
        pytest.param(answering(b""), id="closed-without-answer"),
        pytest.param(answering(http_answer("200 OK", b'{"ok": true}')[:-5]), id="body-cut-short"),
    ],
)
async def test_a_failed_exchange_is_transient(handler: Handler) -> None:
    async with raw_server(handler) as url:
        with pytest.raises(TransientFailure):
            await call(url)


async def test_nobody_listening_is_transient() -> None:
    async with raw_server(answering(b"")) as url:
        pass  # the port is closed again
    with pytest.raises(TransientFailure):
        await call(url)


UNDECODABLE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
    b"Content-Length: 15\r\nConnection: close\r\n\r\nnot gzip at all"
)
ENDLESS_REDIRECT = (
    b"HTTP/1.1 307 Temporary Redirect\r\nLocation: /users/deduct\r\n"
    b"Content-Length: 0\r\nConnection: close\r\n\r\n"
)


async def call_over_httpx(base_url: str) -> Answer | None:
    """`deduct` through `HttpxTransport`: an httpx client set to follow redirects (the
    transport does not)."""
    async with httpx.AsyncClient(timeout=TIMEOUT, follow_redirects=True, max_redirects=3) as client:
        return await deduct(HttpService(client, base_url))


@pytest.mark.parametrize("over", [call, call_over_httpx], ids=["aiohttp", "httpx"])
@pytest.mark.parametrize(
    "raw", [UNDECODABLE, ENDLESS_REDIRECT], ids=["undecodable-body", "endless-redirects"]
)
async def test_an_undecodable_or_endless_answer_is_transient(
    over: Callable[[str], Awaitable[Answer | None]], raw: bytes
) -> None:
    """Before, httpx's DecodingError and TooManyRedirects escaped `HttpxTransport`
    unclassified (it caught only TimeoutException and TransportError)."""
    async with raw_server(answering(raw)) as url:
        with pytest.raises(TransientFailure):
            await over(url)


# ---- reconciliation: GET /_operations/{key} ------------------------------------------------


async def test_a_lookup_replays_the_stored_answer() -> None:
    stored = b'{"status_code": 402, "body": {"detail": "insufficient balance"}}'
    async with raw_server(answering(http_answer("200 OK", stored))) as url:
        with pytest.raises(BusinessFailure, match="insufficient balance"):
            await call(url, lookup)
    async with raw_server(answering(http_answer("404 Not Found", b"{}"))) as url:
        assert await call(url, lookup) is None  # nothing stored under the key


@pytest.mark.parametrize(
    "status",
    ["401 Unauthorized", "403 Forbidden", "400 Bad Request", "405 Method Not Allowed"],
)
async def test_a_refused_lookup_is_an_unknown_outcome_not_a_no(status: str) -> None:
    """The GET itself refused (a gateway, a proxy) says nothing about the key: before, it
    raised BusinessFailure and the executor failed a step the service had applied."""
    async with raw_server(answering(http_answer(status, b'{"detail": "no"}'))) as url:
        with pytest.raises(TransientFailure, match="outcome unknown"):
            await call(url, lookup)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"found": true}', id="no-status_code"),
        pytest.param(b'{"status_code": "200", "body": {}}', id="a-string"),
        pytest.param(b'{"status_code": true, "body": {}}', id="a-bool"),
        pytest.param(b'{"status_code": 99, "body": {}}', id="below-100"),
        pytest.param(b'{"status_code": 600, "body": {}}', id="above-599"),
        pytest.param(b'{"status_code": 200.0, "body": {}}', id="a-float"),
    ],
)
async def test_a_lookup_without_a_valid_status_code_is_transient(body: bytes) -> None:
    """Before, a missing `status_code` raised KeyError (every run crashed, the step never
    expired) and "200" passed as a stored success."""
    async with raw_server(answering(http_answer("200 OK", body))) as url:
        with pytest.raises(TransientFailure, match="no valid status_code"):
            await call(url, lookup)


# ---- what an answer may hold: storable, bounded -------------------------------------------

HOSTILE_DETAIL = "refus\u00e9\u0000\n2026-12-01 INFO order 1 completed" + "x" * 100_000


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(
            b"HTTP/1.1 500 Erreur de paiement refus\xe9\r\nContent-Length: 0\r\n"
            b"Connection: close\r\n\r\n",
            id="latin-1-reason-phrase",
        ),
        pytest.param(
            http_answer(
                "500 Internal Server Error", jsonlib.dumps({"detail": HOSTILE_DETAIL}).encode()
            ),
            id="nul-newline-and-100k-in-the-detail",
        ),
    ],
)
async def test_an_error_text_is_one_storable_capped_line(raw: bytes) -> None:
    """Before, aiohttp's surrogate-escaped reason phrase (Latin-1 é as '\\udce9') and a
    detail's NUL made the write of `last_error` fail (the order stuck in steps_running for
    good), and a detail's newlines and size went into every attempt's log line."""
    async with raw_server(answering(raw)) as url:
        with pytest.raises(TransientFailure) as failed:
            await call(url)
    text = str(failed.value)
    text.encode()  # no lone surrogate
    assert text.startswith("POST /users/deduct: 500 ")
    assert not any(char in text for char in "\x00\n\r")
    assert len(text) <= MAX_ERROR_CHARS + 1
    if "refus\ufffd" not in text:  # the detail: NUL as U+FFFD (as in any answer), a newline
        assert "refus\u00e9\ufffd\\n2026-12-01 INFO" in text  # escaped, not dropped
        assert text.endswith("x\u2026")


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"eta_hours": NaN}', id="NaN"),
        pytest.param(b'{"eta_hours": Infinity}', id="Infinity"),
        pytest.param(b'{"eta_hours": [-Infinity]}', id="minus-Infinity"),
        pytest.param(b'{"eta_hours": 1e999}', id="a-float-that-overflows"),
    ],
)
async def test_a_number_no_database_can_store_is_an_unreadable_answer(body: bytes) -> None:
    """Python's json.dumps writes NaN and Infinity; json.loads took them (and 1e999 as
    inf). Before, such an answer was a success, and on PostgreSQL its transition could not
    be written (invalid input syntax for type json): the step stood requested for good."""
    async with raw_server(answering(http_answer("200 OK", body))) as url:
        with pytest.raises(TransientFailure, match="unreadable body"):
            await call(url)


async def test_a_finite_float_is_still_read() -> None:
    async with raw_server(answering(http_answer("200 OK", b'{"eta_hours": 1.5e3}'))) as url:
        assert await call(url) == {"eta_hours": 1500.0}


def encoded(encoding: str, body: bytes, *, chunked: bool = False) -> bytes:
    """A 200 whose body is `body` compressed per `encoding` (gzip, deflate or none)."""
    data = {"gzip": gzip.compress, "deflate": zlib.compress}.get(encoding, bytes)(body)
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
    if encoding:
        head += f"Content-Encoding: {encoding}\r\n".encode()
    if chunked:  # no Content-Length: read until the end
        pieces = [data[i : i + 1000] for i in range(0, len(data), 1000)]
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces)
        return head + b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
    return head + f"Content-Length: {len(data)}\r\n\r\n".encode() + data


BIG = b'{"description": "' + b"a" * MAX_BODY + b'"}'  # one MiB and a little more, decoded


@pytest.mark.parametrize("over", [call, call_over_httpx], ids=["aiohttp", "httpx"])
@pytest.mark.parametrize("encoding", ["", "gzip", "deflate"], ids=["plain", "gzip", "deflate"])
async def test_an_answer_is_read_whole_up_to_a_mebibyte_decoded(
    over: Callable[[str], Awaitable[Answer | None]], encoding: str
) -> None:
    small = b'{"ok": true, "tags": ["' + b"x" * 10_000 + b'"]}'
    async with raw_server(answering(encoded(encoding, small))) as url:
        assert await over(url) == {"ok": True, "tags": ["x" * 10_000]}


@pytest.mark.parametrize("over", [call, call_over_httpx], ids=["aiohttp", "httpx"])
@pytest.mark.parametrize(
    ("encoding", "chunked"),
    [("", False), ("", True), ("gzip", False), ("deflate", True)],
    ids=["plain", "plain-chunked", "gzip-bomb", "deflate-bomb-chunked"],
)
async def test_an_answer_larger_than_a_mebibyte_decoded_is_unreadable(
    over: Callable[[str], Awaitable[Answer | None]], encoding: str, chunked: bool
) -> None:
    """Before, the whole body was read and inflated: 30 KB of gzip became 30 MB stored in
    the transition log (and +215 MB of memory for the one call)."""
    async with raw_server(answering(encoded(encoding, BIG, chunked=chunked))) as url:
        with pytest.raises(TransientFailure, match=f"larger than {MAX_BODY} bytes"):
            await over(url)


@pytest.mark.parametrize("over", [call, call_over_httpx], ids=["aiohttp", "httpx"])
@pytest.mark.parametrize(
    ("status", "outcome"),
    [("402 Payment Required", BusinessFailure), ("500 Internal Server Error", TransientFailure)],
    ids=["402", "500"],
)
async def test_an_error_answer_larger_than_a_mebibyte_is_classified_by_its_status(
    over: Callable[[str], Awaitable[Answer | None]], status: str, outcome: type[Exception]
) -> None:
    detail = jsonlib.dumps({"detail": "x" * (2 * MAX_BODY)}).encode()
    async with raw_server(answering(http_answer(status, detail))) as url:
        with pytest.raises(outcome, match=f"^POST /users/deduct: {status}$"):
            await over(url)


def redirecting(status: str) -> Handler:
    """The POST is answered `status` to /users/1, whose GET answers a 200 JSON object
    (the user, not a deduct's answer)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"POST"):
            writer.write(
                f"HTTP/1.1 {status}\r\nLocation: /users/1\r\nContent-Length: 0\r\n"
                "Connection: close\r\n\r\n".encode()
            )
        else:
            writer.write(http_answer("200 OK", b'{"id": 1, "balance": 100000}'))
        await writer.drain()

    return handler


@pytest.mark.parametrize("over", [call, call_over_httpx], ids=["aiohttp", "httpx"])
@pytest.mark.parametrize(
    "status", ["301 Moved Permanently", "302 Found", "303 See Other", "307 Temporary Redirect"]
)
async def test_a_redirect_is_not_followed_but_an_unknown_outcome(
    over: Callable[[str], Awaitable[Answer | None]], status: str
) -> None:
    """Before, aiohttp followed a 301/302/303 on POST /users/deduct with a GET /users/1 and
    took its 200 for the deduct's success: the order completed, the customer never
    charged. (An httpx client set to follow redirects did the same.)"""
    async with raw_server(redirecting(status)) as url:
        with pytest.raises(TransientFailure, match=f"^POST /users/deduct: {status}$"):
            await over(url)


def nested(depth: int) -> bytes:
    """A JSON object whose `tags` nest arrays so that the whole is `depth` levels deep."""
    return b'{"ok": true, "tags": ' + b"[" * (depth - 1) + b"1" + b"]" * (depth - 1) + b"}"


async def test_an_answer_nested_as_deep_as_the_bound_is_read() -> None:
    async with raw_server(answering(http_answer("200 OK", nested(MAX_DEPTH)))) as url:
        answer = await call(url)
    assert answer is not None and answer["ok"] is True


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 600], ids=["one-deeper", "600"])
async def test_an_answer_nested_deeper_than_the_bound_is_unreadable(depth: int) -> None:
    """Before, a product answer 600 levels deep (1.2 KB) was stored in the log, and then
    every GET /orders/{id}/transitions failed (PydanticSerializationError, 500) for good."""
    async with raw_server(answering(http_answer("200 OK", nested(depth)))) as url:
        with pytest.raises(TransientFailure, match="unreadable body"):
            await call(url)


DEEPEST = b"[" * 100_000 + b"]" * 100_000  # beyond the parser's recursion limit


@pytest.mark.parametrize(
    ("status", "what"),
    [("200 OK", deduct), ("200 OK", lookup), ("500 Internal Server Error", deduct)],
    ids=["an-answer", "a-lookup", "an-error"],
)
async def test_an_answer_deeper_than_the_parser_can_go_is_unreadable(
    status: str, what: Callable[[HttpService], Awaitable[Answer | None]]
) -> None:
    """Before (fixed on fix-rows, aa96b6a, untested), the parser's RecursionError escaped
    the client: each run crashed on the same answer, the order stuck for good."""
    async with raw_server(answering(http_answer(status, DEEPEST))) as url:
        with pytest.raises(TransientFailure):
            await call(url, what)
