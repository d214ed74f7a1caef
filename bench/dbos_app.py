"""The peer of `python -m bench --only dbos`: order-saga's saga written as a DBOS Transact
async workflow behind FastAPI, as a DBOS user would write it, calling the same reference
services (`order-saga services`) over HTTP with the same idempotency keys.

    .venv-bench/bin/python bench/dbos_app.py --port 8200 --services http://127.0.0.1:8100 \
        --system-database sqlite:///dbos.sqlite

Runs ONLY in the bench's own environment (.venv-bench, bench/requirements-dbos.txt): it
imports nothing of order-saga. `POST /orders` {user_id, product_id, quantity} runs the
workflow (its id is the order id) and answers 201 with {"id", "status", ...}, as order-saga
does, so one load generator drives both:

1. look up the product (a step; its price × quantity is the amount);
2. concurrently, as three steps: charge the user (`POST /users/deduct`), deduct the stock
   (`POST /inventory/deduct`), schedule the shipment (`POST /shipping/schedule`), each with
   the key `{order_id}:{step}:{action}` order-saga sends (fsm/steps.py, fsm/registry.py);
3. if any failed, undo every step that may have had an effect (`/users/refund`,
   `/inventory/restore`, `/shipping/cancel`, keys `{order_id}:payment:refund` ...).

A step retries a transient failure (a timeout, a connection error, 429, 5xx) with DBOS's
own retries; a business failure (another 4xx) is an answer, not retried.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import uvicorn
from dbos import DBOS, DBOSConfig, SetWorkflowID
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel


@contextlib.asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    DBOS.launch()  # DBOS 3 has no FastAPI hook: the app launches it, as DBOS's docs show
    yield
    if _session is not None:
        await _session.close()
    DBOS.destroy()


app = FastAPI(title="order-saga's saga on DBOS Transact", lifespan=lifespan)
_services = ""
_session: aiohttp.ClientSession | None = None


class Transient(Exception):
    """Worth retrying: the call may not have reached the service, or it was overloaded."""


def session() -> aiohttp.ClientSession:
    global _session
    if _session is None:  # made on the serving loop, on first use
        connector = aiohttp.TCPConnector(limit=256)
        _session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=5.0)
        )
    return _session


async def call(method: str, path: str, body: Any = None, key: str | None = None) -> dict[str, Any]:
    """{"ok": bool, "status": int, "body": ...}; raises Transient for what a retry may fix."""
    headers = {"Idempotency-Key": key} if key else {}
    try:
        async with session().request(
            method, f"{_services}{path}", json=body, headers=headers
        ) as reply:
            status, data = reply.status, await reply.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise Transient(f"{method} {path}: {type(exc).__name__}") from exc
    if status == 429 or status >= 500:
        raise Transient(f"{method} {path}: {status}")
    return {"ok": status < 400, "status": status, "body": data}


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, Transient)


RETRY: dict[str, Any] = {
    "retries_allowed": True,
    "interval_seconds": 0.1,
    "max_attempts": 5,
    "backoff_rate": 2.0,
    "should_retry": _transient,
}


@DBOS.step(**RETRY)
async def get_product(product_id: int) -> dict[str, Any]:
    return await call("GET", f"/products/{product_id}")


@DBOS.step(**RETRY)
async def charge(order_id: str, user_id: int, amount: int) -> dict[str, Any]:
    body = {"user_id": user_id, "amount": amount, "order_id": order_id}
    return await call("POST", "/users/deduct", body, f"{order_id}:payment:deduct")


@DBOS.step(**RETRY)
async def refund(order_id: str, user_id: int, amount: int) -> dict[str, Any]:
    body = {"user_id": user_id, "amount": amount, "order_id": order_id}
    return await call("POST", "/users/refund", body, f"{order_id}:payment:refund")


@DBOS.step(**RETRY)
async def deduct_stock(order_id: str, product_id: int, quantity: int) -> dict[str, Any]:
    body = {"product_id": product_id, "quantity": quantity, "order_id": order_id}
    return await call("POST", "/inventory/deduct", body, f"{order_id}:inventory:deduct")


@DBOS.step(**RETRY)
async def restore_stock(order_id: str, product_id: int, quantity: int) -> dict[str, Any]:
    body = {"product_id": product_id, "quantity": quantity, "order_id": order_id}
    return await call("POST", "/inventory/restore", body, f"{order_id}:inventory:restore")


@DBOS.step(**RETRY)
async def schedule(order_id: str, user_id: int, quantity: int) -> dict[str, Any]:
    body = {"order_id": order_id, "user_id": user_id, "quantity": quantity}
    return await call("POST", "/shipping/schedule", body, f"{order_id}:shipping:schedule")


@DBOS.step(**RETRY)
async def cancel_shipment(order_id: str) -> dict[str, Any]:
    body = {"order_id": order_id}
    return await call("POST", "/shipping/cancel", body, f"{order_id}:shipping:cancel")


@DBOS.workflow()
async def place_order(
    order_id: str, user_id: int, product_id: int, quantity: int
) -> dict[str, Any]:
    order: dict[str, Any] = {"id": order_id, "user_id": user_id, "product_id": product_id}
    product = await get_product(product_id)
    price = product["body"].get("price") if product["ok"] else None
    if not isinstance(price, int):
        return {**order, "status": "failed", "reason": "product unavailable"}
    amount = price * quantity
    outcomes = await asyncio.gather(
        charge(order_id, user_id, amount),
        deduct_stock(order_id, product_id, quantity),
        schedule(order_id, user_id, quantity),
        return_exceptions=True,
    )
    # A step that answered a business failure had no effect; one that succeeded, or whose
    # retries ran out (it may have reached the service), is undone.
    done = [not (isinstance(o, dict) and not o["ok"]) for o in outcomes]
    if all(isinstance(o, dict) and o["ok"] for o in outcomes):
        return {**order, "status": "completed", "amount": amount}
    undo = []
    if done[0]:
        undo.append(refund(order_id, user_id, amount))
    if done[1]:
        undo.append(restore_stock(order_id, product_id, quantity))
    if done[2]:
        undo.append(cancel_shipment(order_id))
    undone = await asyncio.gather(*undo, return_exceptions=True)
    status = "failed" if all(isinstance(u, dict) for u in undone) else "needs_attention"
    return {**order, "status": status, "amount": amount}


class NewOrder(BaseModel):
    user_id: int
    product_id: int
    quantity: int


@app.post("/orders", status_code=201)
async def create_order(new: NewOrder) -> JSONResponse:
    order_id = str(uuid.uuid4())
    with SetWorkflowID(order_id):
        result = await place_order(order_id, new.user_id, new.product_id, new.quantity)
    return JSONResponse(result, status_code=201)


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def main() -> None:
    global _services
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--services", required=True, help="the reference services' base URL")
    parser.add_argument("--system-database", required=True, help="DBOS's system database URL")
    args = parser.parse_args()
    _services = args.services.rstrip("/")
    config: DBOSConfig = {
        "name": "order-saga-peer",
        "system_database_url": args.system_database,
        "log_level": "WARNING",
    }
    DBOS(config=config)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
