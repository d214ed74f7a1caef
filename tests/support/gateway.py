"""A gateway in front of the live reference services: an httpx transport that forwards each
request over real HTTP, unless its rule answers first (an auth proxy's 401/403, a 409
"a request with this key is in progress", an odd body), as a real API gateway, auth proxy
or load balancer between the orchestrator and a service may."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx

from fsm.clients import Services
from fsm.wiring import http_services_for
from tests.support.settings import saga_settings

# (request, how many requests to its path so far, this one included) -> the gateway's own
# answer, or None to forward the request to the service.
Rule = Callable[[httpx.Request, int], httpx.Response | None]


class Gateway(httpx.AsyncBaseTransport):
    services: Services  # the clients whose calls go through it (`behind_gateway`)

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.rule: Rule | None = None
        self.seen: Counter[str] = Counter()  # requests per path, forwarded or not

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.seen[path] += 1
        if self.rule is not None and (own := self.rule(request, self.seen[path])) is not None:
            return own
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()

    def lookups(self) -> int:
        """Reconciliation requests (`GET /_operations/{key}`) that reached the gateway."""
        return sum(n for path, n in self.seen.items() if path.startswith("/_operations/"))


def answering(path: str, status: int, body: Any, *, from_call: int = 1) -> Rule:
    """The gateway answers `status` + JSON `body` itself to requests whose path starts with
    `path`, from the `from_call`-th on; everything else reaches the service."""

    def rule(request: httpx.Request, n: int) -> httpx.Response | None:
        if request.url.path.startswith(path) and n >= from_call:
            return httpx.Response(status, json=body)
        return None

    return rule


@asynccontextmanager
async def behind_gateway(services_url: str) -> AsyncIterator[Gateway]:
    """A `Gateway` to the services at `services_url`, with their clients as `open_saga`
    builds them (`gateway.services`), over an httpx client through it."""
    gateway = Gateway()
    settings = saga_settings("sqlite:///unused.db", services_url)  # clients only
    async with httpx.AsyncClient(transport=gateway, timeout=settings.http_timeout) as client:
        gateway.services = http_services_for(settings, client)
        yield gateway
