"""One locked row under load on PostgreSQL (issue 16): POST-like order runs of 32 clients,
unlocked, then with another session holding one in-flight order's row `FOR UPDATE` for
the whole phase. Prints p50/p99 per-order latency and throughput; asserts nothing.

Before the side lane, every op on the locked row cost its group-commit batch the whole
DB_LOCK_TIMEOUT (twice when the pipelined batch was re-run), so every order of the
process waited with it. Now the batch waits 0.1 s, the op moves to the side lane.

Usage: python bench/row_lock.py [--seconds 10] [--clients 32] [--pg postgresql+psycopg://...]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import threading
import time
import uuid

import httpx
import psycopg
from sqlmodel import SQLModel

import fsm.models  # noqa: F401
from downstream.app import create_services_app
from fsm.settings import Settings
from fsm.store import make_engine
from fsm.wiring import http_services_for, open_saga

BUYER = {"user_id": 3, "product_id": 1, "quantity": 1}


def hold(dsn: str, order_id: uuid.UUID, stop: threading.Event, taken: threading.Event) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute("SELECT 1 FROM orders WHERE id = %s FOR UPDATE", [order_id])
        taken.set()
        stop.wait()
        conn.rollback()


async def phase(url: str, args: argparse.Namespace, *, locked: bool) -> str:
    services_app = create_services_app()
    transport = httpx.ASGITransport(app=services_app)
    settings = Settings(database_url=url, db_lock_timeout=5.0)
    latencies: list[float] = []
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://svc") as client,
        open_saga(
            settings, services=http_services_for(settings, client, embedded_url="http://svc")
        ) as saga,
    ):
        store, executor = saga.store, saga.executor
        stop, taken = threading.Event(), threading.Event()
        holder = None
        victim_run = None
        if locked:
            victim, _ = await store.create_order(**BUYER, owner=executor.owner)
            dsn = url.replace("postgresql+psycopg://", "postgresql://")
            holder = threading.Thread(target=hold, args=(dsn, victim.id, stop, taken))
            holder.start()
            await asyncio.to_thread(taken.wait)
            victim_run = asyncio.ensure_future(executor.drive(victim))
        end = time.monotonic() + args.seconds

        async def client_loop() -> None:
            while time.monotonic() < end:
                started = time.monotonic()
                order, _ = await store.create_order(**BUYER, owner=executor.owner)
                await executor.drive(order)
                latencies.append(time.monotonic() - started)

        await asyncio.gather(*(client_loop() for _ in range(args.clients)))
        stop.set()
        if holder is not None:
            await asyncio.to_thread(holder.join)
        if victim_run is not None:
            await asyncio.gather(victim_run, return_exceptions=True)
        moved = sum(store.committer.moved.values())
    services_app.state.store.close()
    q = statistics.quantiles(latencies, n=100)
    return (
        f"{'one row locked' if locked else 'unlocked      '}: {len(latencies)} orders in "
        f"{args.seconds:.0f}s ({len(latencies) / args.seconds:.0f}/s), p50 "
        f"{q[49] * 1000:.0f} ms, p99 {q[98] * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms; "
        f"ops moved to the side lane: {moved}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432")
    args = parser.parse_args()
    name = f"order_saga_bench_rowlock_{os.getpid()}"
    admin = args.pg.replace("postgresql+psycopg://", "postgresql://") + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"{args.pg}/{name}"
    try:
        engine = make_engine(url)
        SQLModel.metadata.create_all(engine)
        engine.dispose()
        for locked in (False, True):
            print(asyncio.run(phase(url, args, locked=locked)), flush=True)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
