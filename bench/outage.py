"""Calls a failing service receives during an outage, without and with the circuit breaker
(issue 10). Prints figures; asserts nothing.

Scenario: `user.deduct` answers 500 for the whole outage; N orders are placed at once
(each run retries with the same key, `--attempts` per call) and a sweep re-drives stuck
orders every second, as `serve` does, for `--outage` seconds. Then the fault is cleared and
every order is driven to a terminal state. The services run in-process (ASGI transport) so
the figures count calls, not network noise.

Usage: python bench/outage.py [--orders 30] [--outage 5] [--threshold 3] [--cooldown 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from collections import Counter

import httpx
from sqlmodel import SQLModel

import fsm.models  # noqa: F401
from downstream.app import create_services_app
from fsm.recovery import resume_stuck
from fsm.settings import Settings
from fsm.store import make_engine
from fsm.wiring import http_services_for, open_saga

OUTAGE_CALLS = 100_000  # more than any run here makes: the outage lasts `--outage` s


async def scenario(args: argparse.Namespace, *, breaker: bool) -> str:
    services_app = create_services_app()
    transport = httpx.ASGITransport(app=services_app)
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            database_url=f"sqlite:///{tmp}/outage.db",
            max_attempts=args.attempts,
            backoff_base=0.05,
            backoff_max=0.5,
            step_deadline=120,
            breaker_threshold=args.threshold,
            breaker_cooldown=args.cooldown,
        )
        engine = make_engine(settings.database_url)
        SQLModel.metadata.create_all(engine)
        engine.dispose()
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://svc") as client,
            open_saga(
                settings,
                services=http_services_for(settings, client, embedded_url="http://svc"),
                breakers=breaker,
            ) as saga,
        ):
            store, executor = saga.store, saga.executor
            fault = {"operation": "user.deduct", "mode": "error", "count": OUTAGE_CALLS}
            (await client.post("/_faults", json=fault)).raise_for_status()

            async def sweep() -> None:
                while True:
                    await asyncio.sleep(1.0)
                    await resume_stuck(store=store, executor=executor, older_than=0, limit=1000)

            orders = [
                (
                    await store.create_order(
                        user_id=3, product_id=1, quantity=1, owner=executor.owner
                    )
                )[0]
                for _ in range(args.orders)
            ]
            runs = [asyncio.create_task(executor.drive(o)) for o in orders]
            sweeper = asyncio.create_task(sweep())
            await asyncio.sleep(args.outage)
            left = sum(f["count"] for f in (await client.get("/_faults")).json()["faults"])
            calls = OUTAGE_CALLS - left
            (await client.delete("/_faults")).raise_for_status()
            start = time.monotonic()
            await asyncio.gather(*runs)
            while any(store.get(o.id).status not in ("completed", "failed") for o in orders):
                await asyncio.sleep(0.1)
            recovered = time.monotonic() - start
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            outcomes = Counter(store.get(o.id).status for o in orders)
            breakers = saga.breakers
    services_app.state.store.close()
    stats = f", breaker {breakers['user.deduct'].stats}" if breakers else ""
    return (
        f"{'with' if breaker else 'without'} breaker: {calls} user.deduct calls in "
        f"{args.outage:.0f}s of outage for {args.orders} orders; all terminal "
        f"{recovered:.1f}s after recovery: {dict(outcomes)}{stats}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=30)
    parser.add_argument("--outage", type=float, default=5.0)
    parser.add_argument("--attempts", type=int, default=4)
    parser.add_argument("--threshold", type=int, default=3)
    parser.add_argument("--cooldown", type=float, default=1.0)
    args = parser.parse_args()
    for breaker in (False, True):
        print(asyncio.run(scenario(args, breaker=breaker)), flush=True)


if __name__ == "__main__":
    main()
