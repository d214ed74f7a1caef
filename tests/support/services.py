"""The reference services in tests: served on a loopback port, read for assertions
(`Downstream`), given faults, and the one conservation check (`Books` + `assert_conserved`)."""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import TYPE_CHECKING, Any

import httpx
import uvicorn

from downstream.seed import MISSING_PRODUCT_ID
from tests.support.waiting import wait_until

if TYPE_CHECKING:
    from fsm.models import Order

# The tests' own requests to the services (resets, faults, reads, polls). `httpx.get(...)`
# builds a client per call, and with it an SSL context loading the CA bundle: 27 ms of CPU
# a call against 0.7 ms here (a poll 20 times a second spent half a core on it). Nothing
# is carried from one request to the next: no connection kept alive (a server stopped
# between tests leaves none stale), no cookie kept.
HTTP = httpx.Client(
    limits=httpx.Limits(max_keepalive_connections=0),
    cookies=CookieJar(DefaultCookiePolicy(allowed_domains=[])),
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class LiveServer:
    """An ASGI app served by uvicorn on 127.0.0.1 in a background thread; `options` are
    more `uvicorn.Config` keywords (e.g. `serve`'s own, from `uvicorn_options`)."""

    def __init__(
        self, app: Any, *, lifespan: str = "off", port: int | None = None, **options: Any
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan=lifespan,
            **options,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> LiveServer:
        self.thread.start()
        wait_until(lambda: self.server.started, 20, what="uvicorn", alive=self.thread.is_alive)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def answers(url: str) -> bool:
    """Does GET `url` answer 200 yet (a server still starting refuses the connection)?"""
    try:
        return HTTP.get(url).status_code == 200
    except httpx.TransportError:
        return False


class Downstream:
    """Reads the reference services' state for assertions (balance, stock, shipments)."""

    def __init__(self, url: str, *, token: str | None = None) -> None:
        self.url = url
        # The services mounted in a `serve` with an API token want it too.
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def get(self, path: str) -> Any:
        return HTTP.get(f"{self.url}{path}", headers=self.headers).json()

    def balance(self, user_id: int) -> int:
        return int(self.get(f"/users/{user_id}")["balance"])

    def stock(self, product_id: int) -> int:
        return int(self.get(f"/inventory/{product_id}")["quantity"])

    def shipment(self, order_id: object) -> dict[str, Any] | None:
        response = HTTP.get(f"{self.url}/shipping/{order_id}", headers=self.headers)
        return None if response.status_code == 404 else dict(response.json())

    def effects(self) -> dict[str, int]:
        return dict(self.get("/_effects")["effects"])

    def fault(self, operation: str, mode: str, count: int = 1, seconds: float = 0.05) -> None:
        body = {"operation": operation, "mode": mode, "count": count, "seconds": seconds}
        HTTP.post(f"{self.url}/_faults", json=body, headers=self.headers).raise_for_status()

    def clear_faults(self) -> None:
        HTTP.delete(f"{self.url}/_faults", headers=self.headers).raise_for_status()


@dataclass(frozen=True)
class Fault:
    """One entry for `POST /_faults` (SPEC §4)."""

    operation: str
    mode: str
    count: int = 1000
    seconds: float | None = None


def set_faults(services_url: str, faults: Iterable[Fault]) -> None:
    """Replace the pending faults with `faults`."""
    HTTP.delete(f"{services_url}/_faults").raise_for_status()
    for fault in faults:
        body = {"operation": fault.operation, "mode": fault.mode, "count": fault.count}
        if fault.seconds is not None:
            body["seconds"] = fault.seconds
        HTTP.post(f"{services_url}/_faults", json=body).raise_for_status()


@dataclass(frozen=True)
class Books:
    """What the reference services held before the test: the baseline to conserve."""

    balances: dict[int, int]
    stocks: dict[int, int]

    @classmethod
    def read(
        cls, downstream: Downstream, *, users: Iterable[int], products: Iterable[int]
    ) -> Books:
        return cls(
            {u: downstream.balance(u) for u in set(users)},
            {p: downstream.stock(p) for p in set(products) if p != MISSING_PRODUCT_ID},
        )


def assert_conserved(downstream: Downstream, books: Books, orders: Sequence[Order]) -> None:
    """Every effect at most once; balance and stock moved by exactly the completed
    orders; no live shipment for an order that did not stay completed."""
    effects = downstream.effects()
    twice = {k: n for k, n in effects.items() if n > 1}
    assert not twice, f"effects applied more than once: {twice}"
    for user, before in books.balances.items():
        spent = sum(o.amount or 0 for o in orders if o.user_id == user and o.status == "completed")
        assert downstream.balance(user) == before - spent, f"user {user}: money not conserved"
    for product, before in books.stocks.items():
        taken = sum(
            o.quantity for o in orders if o.product_id == product and o.status == "completed"
        )
        assert downstream.stock(product) == before - taken, f"product {product}: stock"
    for o in orders:
        shipment = downstream.shipment(o.id)
        if o.status == "completed":
            assert shipment is not None and shipment["status"] == "scheduled", (o.id, shipment)
        else:
            assert shipment is None or shipment["status"] != "scheduled", (o.id, shipment)


def order_effects(effects: Mapping[str, int], order_id: uuid.UUID) -> dict[str, int]:
    prefix = f"{order_id}:"
    return {k[len(prefix) :]: n for k, n in effects.items() if k.startswith(prefix)}
