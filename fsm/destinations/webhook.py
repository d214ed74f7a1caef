"""Webhook delivery, signed per Standard Webhooks (standardwebhooks.com): the headers
`webhook-id` (the event id), `webhook-timestamp` (seconds) and `webhook-signature`
(`v1,` + base64 HMAC-SHA256 of `<id>.<timestamp>.<body>` under the secret's key; two,
space-separated, while a rotated secret's predecessor still signs: `signing_keys`).
One POST per attempt; no retries here and no database (fsm.relay schedules them).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import secrets
import time
from datetime import datetime

import aiohttp

from fsm.destinations import DELIVERED, Attempt, refused, transient
from fsm.outbox import CONTENT_TYPE
from fsm.outbox_sql import Claimed, Destination

SECRET_PREFIX = "whsec_"
# Worth another try: the endpoint is down, overloaded or asks to slow down.
_RETRYABLE_4XX = frozenset({408, 425, 429})
# An answer's body is read up to this much (nothing in it is used; it is read so that the
# connection can be reused). Past it the connection is dropped instead: an endpoint cannot
# make the relay read, or hold in memory, more than this per request.
MAX_ANSWER_BYTES = 64 * 1024


def new_secret() -> str:
    """A signing secret, `whsec_` + base64 of 24 random bytes (shown once, at `add` and
    `rotate`)."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


Keys = list[tuple[bytes, float]]  # each signing key with when it stops (epoch seconds)


def current_secret(stored: str) -> str:
    """The current secret of a webhook's `secret` column (`signing_keys`)."""
    return stored.partition(" ")[0]


def fingerprint(secret: str) -> str:
    """Which `secret` a rotation's overlap columns go with (event_destinations.previous_for):
    16 hex digits of its SHA-256, not the secret."""
    return hashlib.sha256(secret.encode()).hexdigest()[:16]


def signing_keys(
    secret: str,
    previous: str | None = None,
    until: datetime | None = None,
    previous_for: str | None = None,
) -> Keys:
    """The keys a webhook signs with: its current secret's (never stops), then, until
    `until`, the `previous` one a rotation replaced (event_destinations.previous_secret,
    previous_until), only while `secret` is the one that rotation wrote (`previous_for`):
    a release before these columns rotates by `secret` alone, and its rotation ends this
    overlap. `secret` in the form that release's `rotate` writes, `<new> <old>@<epoch
    seconds>`: that overlap, the columns ignored. A previous secret past its end is not
    decoded: what it holds no longer matters."""
    current, _, legacy = secret.partition(" ")
    ends = None if until is None else until.timestamp()
    if legacy:
        previous, _, at = legacy.partition("@")
        ends = float(at)
    elif previous_for != fingerprint(secret):
        previous = None
    keys = [(signing_key(current), math.inf)]
    if previous and ends is not None and ends > time.time():
        keys.append((signing_key(previous), ends))
    return keys


def destination_keys(destination: Destination) -> Keys:
    """A webhook's `signing_keys`, from its row."""
    assert destination.secret is not None
    return signing_keys(
        destination.secret,
        destination.previous_secret,
        destination.previous_until,
        destination.previous_for,
    )


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    return _signature(signing_key(secret), msg_id, timestamp, body)


def signing_key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def _signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    # hmac.digest: OpenSSL's one-shot HMAC, not the hmac.HMAC object's Python layers.
    digest = hmac.digest(key, f"{msg_id}.{timestamp}.".encode() + body, "sha256")
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(secret: str | bytes | Keys, msg_id: str, body: bytes) -> dict[str, str]:
    """The request's headers; `secret` one secret (`whsec_…`), one key (`signing_key`) or
    a webhook's `signing_keys`. During a rotation's overlap two signatures, space-separated,
    as Standard Webhooks allows: a consumer verifies with either secret."""
    if isinstance(secret, bytes):
        keys = [(secret, math.inf)]
    else:
        keys = secret if isinstance(secret, list) else signing_keys(secret)
    timestamp = int(time.time())
    signatures = [_signature(k, msg_id, timestamp, body) for k, until in keys if timestamp < until]
    return {
        "content-type": CONTENT_TYPE,
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(signatures),
    }


def new_session(*, connections: int = 100) -> aiohttp.ClientSession:
    """A webhook's session: no cookie jar (an endpoint's cookies are not sent back), no
    headers beyond the signed ones but Host and Content-Length; at most `connections` open
    at once."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections),
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
    )


class WebhookSender:
    """POST each event to one URL, on a session (a connection pool) of its own: a slow
    endpoint holds its own connections only, never those another webhook's requests need.
    `connections`: as many as the relay can have in flight to it (a batch's events and
    its claimed retries); none waits for a connection. Made in the relay's event loop."""

    def __init__(self, *, url: str, keys: Keys, timeout: float, connections: int) -> None:
        self.url, self.timeout = url, timeout
        self.session = new_session(connections=connections)
        # Made once, not per event: the keys decoded, the timeout (an attrs object).
        self._keys = keys
        self._client_timeout = aiohttp.ClientTimeout(total=timeout)

    async def send(self, event: Claimed) -> Attempt:
        body = event.body.encode()
        headers = signed_headers(self._keys, event.event_id, body)
        return await _post(self.session, self.url, headers, body, self._client_timeout)

    async def aclose(self) -> None:
        await self.session.close()


async def post(
    session: aiohttp.ClientSession, url: str, keys: Keys, msg_id: str, body: bytes, timeout: float
) -> Attempt:
    """One POST signed with `keys` (`destination_keys`). aiohttp, not httpx: an event costs
    the relay's process several times less CPU (it shares that process with the orders in
    `serve` and `worker`)."""
    headers = signed_headers(keys, msg_id, body)
    return await _post(session, url, headers, body, aiohttp.ClientTimeout(total=timeout))


async def _post(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    body: bytes,
    timeout: aiohttp.ClientTimeout,
) -> Attempt:
    try:
        async with session.post(
            url, data=body, headers=headers, timeout=timeout, allow_redirects=False
        ) as response:
            status = response.status
            if not await _read_answer(response.content):
                response.close()  # the rest unread: the connection is dropped, not reused
    # The error messages below are stored, listed and logged: none may carry the URL, whose
    # path or query may hold a token (the relay's log names a webhook by its label).
    except TimeoutError:
        return transient(f"timeout after {timeout.total:g}s")
    except aiohttp.InvalidURL as exc:  # a ClientError and a ValueError, whose message is the URL
        return refused(f"unusable URL: {type(exc).__name__}")
    except aiohttp.ClientResponseError as exc:  # not an HTTP answer; its message ends in the URL
        return transient(f"answer: {type(exc).__name__}: {' '.join(exc.message.split())}")
    except aiohttp.ClientError as exc:  # names the host and port at most
        return transient(f"connection: {type(exc).__name__}: {exc}".strip().rstrip(":"))
    except ValueError as exc:  # a URL no request can go to (a bad host name: UnicodeError)
        return refused(f"unusable URL: {type(exc).__name__}: {exc}".strip().rstrip(":"))
    if 200 <= status < 300:
        return DELIVERED
    answer = f"HTTP {status}"
    if status >= 500 or status in _RETRYABLE_4XX:
        return transient(answer)
    return refused(answer)


async def _read_answer(content: aiohttp.StreamReader) -> bool:
    """Read the answer's body, at most MAX_ANSWER_BYTES of it; whether that was all."""
    left = MAX_ANSWER_BYTES
    while chunk := await content.read(left):
        left -= len(chunk)
        if left <= 0:
            return content.at_eof()
    return True
