"""Webhook delivery, signed per Standard Webhooks (standardwebhooks.com): the headers
`webhook-id` (the event id), `webhook-timestamp` (seconds) and `webhook-signature`
(`v1,` + base64 HMAC-SHA256 of `<id>.<timestamp>.<body>` under the secret's key).
One POST per attempt; no retries here and no database (fsm.relay schedules them).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time

import aiohttp

from fsm.destinations import DELIVERED, Attempt, refused, transient
from fsm.outbox import CONTENT_TYPE
from fsm.outbox_sql import Claimed

SECRET_PREFIX = "whsec_"
# Worth another try: the endpoint is down, overloaded or asks to slow down.
_RETRYABLE_4XX = frozenset({408, 425, 429})


def new_secret() -> str:
    """A signing secret, `whsec_` + base64 of 24 random bytes (shown once, at `add`)."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def signed_headers(secret: str, msg_id: str, body: bytes) -> dict[str, str]:
    timestamp = int(time.time())
    return {
        "content-type": CONTENT_TYPE,
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, msg_id, timestamp, body),
    }


class WebhookSender:
    """POST each event to one URL with `session` (shared by every webhook of a relay)."""

    def __init__(
        self, *, url: str, secret: str, session: aiohttp.ClientSession, timeout: float
    ) -> None:
        self.url, self.secret, self.session, self.timeout = url, secret, session, timeout

    async def send(self, event: Claimed) -> Attempt:
        body = event.body.encode()
        return await post(self.session, self.url, self.secret, event.event_id, body, self.timeout)

    async def aclose(self) -> None:
        pass  # the session is the relay's


async def post(
    session: aiohttp.ClientSession, url: str, secret: str, msg_id: str, body: bytes, timeout: float
) -> Attempt:
    """One signed POST. aiohttp, not httpx: an event costs the relay's process several
    times less CPU (it shares that process with the orders in `serve` and `worker`)."""
    try:
        async with session.post(
            url,
            data=body,
            headers=signed_headers(secret, msg_id, body),
            timeout=aiohttp.ClientTimeout(total=timeout),
            allow_redirects=False,
        ) as response:
            status = response.status
            await response.read()  # the connection goes back to the pool
    except TimeoutError:
        return transient(f"timeout after {timeout:g}s")
    except aiohttp.ClientError as exc:
        return transient(f"connection: {type(exc).__name__}: {exc}".strip().rstrip(":"))
    if 200 <= status < 300:
        return DELIVERED
    answer = f"HTTP {status}"
    if status >= 500 or status in _RETRYABLE_4XX:
        return transient(answer)
    return refused(answer)
