"""A webhook endpoint for tests, on raw asyncio sockets so it can misbehave as real ones do:
answer 200 or 500 (with a body of `answer_bytes`), hang past the client's timeout, close
the connection without an answer, or answer what is not HTTP. It records every request
(headers, body), how many requests for one event id were in flight at once, and answers
cut short. Runs on the test's own event loop, on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import standardwebhooks

Mode = Literal["ok", "500", "hang", "close", "not_http"]


@dataclass
class Request:
    headers: dict[str, str]
    body: bytes

    @property
    def event(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed

    def signed_by(self, secret: str) -> bool:
        """Whether a consumer holding `secret` takes it (`standardwebhooks`, as README says)."""
        try:
            standardwebhooks.Webhook(secret).verify(self.body, self.headers)
        except standardwebhooks.webhooks.WebhookVerificationError:
            return False
        return True

    @property
    def signatures(self) -> int:
        return len(self.headers["webhook-signature"].split())


@dataclass
class Endpoint:
    mode: Mode = "ok"
    delay: float = 0.0  # seconds before answering (to make overlaps visible)
    answer_bytes: int = 0  # each answer's body, written 64 KiB at a time
    requests: list[Request] = field(default_factory=list)  # answered 200, in arrival order
    attempts: int = 0  # every request, whatever the answer
    most_at_once: int = 0  # the most requests of one event id in flight together
    failing: set[str] = field(default_factory=set)  # event ids answered 500 whatever the mode
    # ("start" | "end", event id) of every request that got that far, in order
    log: list[tuple[str, str]] = field(default_factory=list)
    answered_bytes: int = 0  # of the answers' bodies, written (sent or in socket buffers)
    dropped: int = 0  # answers the client went away from before their body's end
    _in_flight: Counter[str] = field(default_factory=Counter)
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    url: str = ""

    async def __aenter__(self) -> Endpoint:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/hook"
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def events(self) -> list[dict[str, Any]]:
        return [r.event for r in self.requests]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while await self._one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client went away, or the endpoint is closing
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")[1:]
        headers = {}
        for line in lines:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        self.attempts += 1
        mode = self.mode
        if mode == "close":
            return False
        if mode == "hang":
            await asyncio.sleep(3600)
        if mode == "not_http":
            writer.write(b"HTTP/1.1 OK 200\r\n\r\n")  # a status line turned around
            await writer.drain()
            return False
        msg_id = headers.get("webhook-id", "")
        if msg_id in self.failing:
            mode = "500"
        self.log.append(("start", msg_id))
        self._in_flight[msg_id] += 1
        self.most_at_once = max(self.most_at_once, self._in_flight[msg_id])
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
        finally:
            self._in_flight[msg_id] -= 1
            self.log.append(("end", msg_id))
        status = b"200 OK" if mode == "ok" else b"500 Internal Server Error"
        if mode == "ok":
            self.requests.append(Request(headers, body))
        length = str(self.answer_bytes).encode()
        writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-length: " + length + b"\r\n\r\n")
        await writer.drain()
        return await self._body(writer)

    async def _body(self, writer: asyncio.StreamWriter) -> bool:
        """The answer's body; False (counted in `dropped`) when the client went away."""
        chunk, left = bytes(1 << 16), self.answer_bytes
        try:
            while left > 0:
                writer.write(chunk[:left])
                await writer.drain()
                self.answered_bytes += min(left, len(chunk))
                left -= len(chunk)
        except ConnectionError:
            self.dropped += 1
            return False
        return True
