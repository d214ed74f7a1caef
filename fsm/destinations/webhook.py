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

import httpx

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
    """POST each event to one URL with `client` (shared by every webhook of a relay)."""

    def __init__(self, *, url: str, secret: str, client: httpx.AsyncClient, timeout: float):
        self.url, self.secret, self.client, self.timeout = url, secret, client, timeout

    async def send(self, event: Claimed) -> Attempt:
        body = event.body.encode()
        return await post(self.client, self.url, self.secret, event.event_id, body, self.timeout)

    async def aclose(self) -> None:
        pass  # the client is the relay's


async def post(
    client: httpx.AsyncClient, url: str, secret: str, msg_id: str, body: bytes, timeout: float
) -> Attempt:
    try:
        response = await client.post(
            url, content=body, headers=signed_headers(secret, msg_id, body), timeout=timeout
        )
    except httpx.TimeoutException:
        return transient(f"timeout after {timeout:g}s")
    except httpx.TransportError as exc:
        return transient(f"connection: {type(exc).__name__}: {exc}".strip().rstrip(":"))
    if response.is_success:
        return DELIVERED
    answer = f"HTTP {response.status_code}"
    if response.status_code >= 500 or response.status_code in _RETRYABLE_4XX:
        return transient(answer)
    return refused(answer)
