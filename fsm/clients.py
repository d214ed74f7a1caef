"""One Protocol per downstream service and its httpx implementation.

Every answer is classified here, once, into the three outcomes of SPEC §2: a returned
dict (2xx), `BusinessFailure` (a definite 4xx "no") or `TransientFailure` (5xx, timeout,
connection error, unreadable body: the effect may or may not have happened).
"""

from __future__ import annotations

from typing import Any, Protocol

import aiohttp
import httpx

from fsm.errors import BusinessFailure, NotFound, TransientFailure

Answer = dict[str, Any]

# 4xx codes that mean "try again later", not "no".
_RETRYABLE_4XX = {408, 425, 429}


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


class HttpService:
    """Shared request + classification logic for one service's base URL."""

    def __init__(self, client: httpx.AsyncClient, base_url: str) -> None:
        self.client = client
        self.base_url = base_url.rstrip("/")

    async def send(
        self, method: str, path: str, *, json: Any = None, key: str | None = None
    ) -> Answer:
        headers = {"Idempotency-Key": key} if key else {}
        url = f"{self.base_url}{path}"
        try:
            response = await self.client.request(method, url, json=json, headers=headers)
        except httpx.TimeoutException as exc:
            raise TransientFailure(f"{method} {path}: timed out ({type(exc).__name__})") from exc
        except (httpx.TransportError, aiohttp.ClientError) as exc:
            # The aiohttp transport (fsm.wiring.http_client) maps most of its errors to
            # httpx's; one it leaves unmapped (a malformed answer, say) is as uncertain.
            raise TransientFailure(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        return classify(method, path, response)

    async def lookup(self, key: str) -> Answer | None:
        """Reconcile: ask what happened to `key`. The stored answer is replayed through the
        same classification, so a stored 402 raises BusinessFailure as the original did."""
        try:
            stored = await self.send("GET", f"/_operations/{key}")
        except NotFound:
            return None
        replay = httpx.Response(int(stored["status_code"]), json=stored.get("body"))
        return classify("replay", key, replay)


def classify(method: str, path: str, response: httpx.Response) -> Answer:
    status = response.status_code
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    if 200 <= status < 300:
        if not isinstance(body, dict):
            raise TransientFailure(f"{method} {path}: unreadable body", status=status)
        return body
    message = body.get("detail") if isinstance(body, dict) else None
    text = f"{method} {path}: {status} {message or response.reason_phrase}"
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
