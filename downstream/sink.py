"""A reference event consumer: a webhook sink that verifies Standard Webhooks signatures,
deduplicates by event id and records what it saw, so the README can show events arriving
and tests can assert on them. In memory only (reset with the services).

    PUT    /sink/secret   {"secret": "whsec_..."}  the secret `order-saga webhooks add` printed
    POST   /sink          an event (401 unsigned or tampered, 200 accepted, a repeat counted)
    GET    /sink          {"events": [first arrivals, in arrival order], "duplicates": n, ...}
    DELETE /sink          forget what was seen

Its own implementation of the signature check (a consumer does not import the orchestrator);
the fault board's `sink.receive` makes it answer 500 or hang.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request, Response, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from downstream.deps import FaultsDep
from downstream.faults import FaultBoard
from downstream.services import DIRECT
from downstream.store import Outcome, fail

router = APIRouter(prefix="/sink", tags=["event sink"])
TOLERANCE = 300  # seconds: a timestamp further off is a replay (Standard Webhooks)
_STAMP_DIGITS = 12  # a Unix time in seconds has 10 until the year 2286


def verify(secret: str, headers: dict[str, str], body: bytes) -> str:
    """The message id of a correctly signed, fresh request; ValueError saying why not."""
    msg_id, stamp, signatures = (
        headers.get("webhook-id"),
        headers.get("webhook-timestamp"),
        headers.get("webhook-signature"),
    )
    if not (msg_id and stamp and signatures):
        raise ValueError("missing webhook-id, webhook-timestamp or webhook-signature")
    # Unix seconds, ASCII digits only: int() would also take " 1_7e9 " spellings, and 400
    # digits parse but overflow the float comparison below (a 500, not a 401).
    if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= _STAMP_DIGITS):
        raise ValueError("webhook-timestamp is not a Unix time in seconds")
    if abs(time.time() - int(stamp)) > TOLERANCE:
        raise ValueError("webhook-timestamp too far from now")
    key = base64.b64decode(secret.removeprefix("whsec_"))
    # hmac.digest: OpenSSL's one-shot HMAC (the hmac.HMAC object's Python layers cost more).
    expected = base64.b64encode(
        hmac.digest(key, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256)
    )
    for signature in signatures.split():
        version, _, value = signature.partition(",")
        # Bytes: compare_digest refuses a str with a non-ASCII character (TypeError, a 500).
        if version == "v1" and hmac.compare_digest(value.encode(), expected):
            return msg_id
    raise ValueError("no valid signature")


ACCEPTED = Outcome(200, {"duplicate": False})
DUPLICATE = Outcome(200, {"duplicate": True})
# Their answers, rendered once (a Response is not changed by sending it).
_RENDERED = {id(ACCEPTED): JSONResponse(ACCEPTED.body), id(DUPLICATE): JSONResponse(DUPLICATE.body)}
_SIGNED = (b"webhook-id", b"webhook-timestamp", b"webhook-signature")


class Sink:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.secret: str | None = None
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.events: list[dict[str, Any]] = []
            self.seen: set[str] = set()
            self.duplicates = 0
            self.rejected = 0

    def receive(self, headers: dict[str, str], body: bytes) -> Outcome:
        with self._lock:
            if self.secret is None:
                self.rejected += 1
                return fail(401, "no secret set (PUT /sink/secret)")
            try:
                msg_id = verify(self.secret, headers, body)
                event = json.loads(body)
            except ValueError as exc:
                self.rejected += 1
                return fail(401, f"rejected: {exc}")
            if msg_id in self.seen:
                self.duplicates += 1
                return DUPLICATE
            self.seen.add(msg_id)
            self.events.append(event)
            return ACCEPTED

    def summary(self) -> dict[str, Any]:
        with self._lock:
            return {
                "events": list(self.events),
                "duplicates": self.duplicates,
                "rejected": self.rejected,
            }


async def get_sink(request: Request) -> Sink:  # async: a plain def is a thread hop
    sink: Sink = request.app.state.sink
    return sink


SinkDep = Annotated[Sink, Depends(get_sink)]


class SecretIn(BaseModel):
    secret: str = Field(pattern=r"^whsec_[A-Za-z0-9+/=]{16,}$")


@router.put("/secret", status_code=status.HTTP_204_NO_CONTENT)
async def set_secret(body: SecretIn, sink: SinkDep) -> Response:
    sink.secret = body.secret
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "",
    responses={401: {"description": "unsigned, tampered or too old (Standard Webhooks)"}},
)
async def receive(
    request: Request,
    sink: SinkDep,
    faults: FaultsDep,
    webhook_id: Annotated[str | None, Header()] = None,
    webhook_timestamp: Annotated[str | None, Header()] = None,
    webhook_signature: Annotated[str | None, Header()] = None,
) -> JSONResponse:
    return await _receive(
        sink,
        faults,
        await request.body(),
        {"webhook-id": webhook_id, "webhook-timestamp": webhook_timestamp,
         "webhook-signature": webhook_signature},
    )  # fmt: skip


async def _receive(
    sink: Sink, faults: FaultBoard, body: bytes, headers: dict[str, str | None]
) -> JSONResponse:
    present = {k: v for k, v in headers.items() if v is not None}
    outcome = await faults.run("sink.receive", lambda: sink.receive(present, body))
    rendered = _RENDERED.get(id(outcome))
    if rendered is not None:
        return rendered
    return JSONResponse(outcome.body, status_code=outcome.status_code)


async def _receive_directly(request: Request, _: str) -> Response:
    """Every POST, as the services' saga calls are served (`downstream.services.DirectCalls`:
    before FastAPI's routing and parameter solving; nothing here can fail to resolve: three
    optional headers and two app-state objects), with the same endpoint code."""
    state = request.app.state
    # One pass over the raw headers (each `request.headers.get` is a pass of its own); the
    # first of a repeated header, as `Headers.get` answers.
    headers: dict[str, str | None] = {}
    for name, value in request.scope["headers"]:
        if name in _SIGNED:
            headers.setdefault(name.decode(), value.decode("latin-1"))
    return await _receive(state.sink, state.faults, await request.body(), headers)


@router.get("")
async def seen(sink: SinkDep) -> dict[str, Any]:
    return sink.summary()


@router.delete("", status_code=status.HTTP_204_NO_CONTENT)
async def forget(sink: SinkDep) -> Response:
    sink.reset()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


DIRECT[("POST", "/sink")] = _receive_directly  # a POST per event and webhook
