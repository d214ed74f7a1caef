"""Writer thread vs async driver: the measurement behind the engine's write path (issue 8).

The same work in every row: N "orders" at once, each committing 10 transitions one after
the other (a guarded UPDATE of its row + an INSERT into the log, one transaction each, the
next only after the previous has committed), driven from one asyncio event loop.

- writer thread: `fsm.committer.Committer`, the engine's own group-commit thread (writes
  queued while a transaction commits go into the next one);
- psycopg async, one connection per order: `psycopg.AsyncConnection`s in a pool, each
  transition its own transaction (what an async driver gives without a commit pipeline);
- psycopg async, one shared connection: the loop itself batching writes on one
  AsyncConnection (group commit without a thread);
- aiosqlite: SQLite through its async wrapper, one connection per order.

Usage: python -m bench.driver_choice [--orders N] [--pg URL]
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import psycopg

from fsm.committer import Backend, Committer

STEPS = 10
UPDATE = "UPDATE t_orders SET version = %s WHERE id = %s AND version = %s"
INSERT = "INSERT INTO t_log (order_id, seq) VALUES (%s, %s)"
SCHEMA = (
    "CREATE TABLE t_orders (id TEXT PRIMARY KEY, version INTEGER NOT NULL)",
    "CREATE TABLE t_log (order_id TEXT NOT NULL, seq INTEGER NOT NULL)",
)


def _write(qmark: bool, oid: str, seq: int, cursor: Any) -> None:
    update, insert = (UPDATE.replace("%s", "?"), INSERT.replace("%s", "?")) if qmark else (
        UPDATE, INSERT)  # fmt: skip
    cursor.execute(update, [seq, oid, seq - 1])
    if cursor.rowcount != 1:
        raise RuntimeError("lost a write")
    cursor.execute(insert, [oid, seq])


async def orders_per_second(
    n: int, concurrency: int, new_ids: list[str], write: Callable[[str, int], Awaitable[None]]
) -> float:
    gate = asyncio.Semaphore(concurrency)

    async def one(oid: str) -> None:
        async with gate:
            for seq in range(1, STEPS + 1):
                await write(oid, seq)

    started = time.perf_counter()
    await asyncio.gather(*(one(oid) for oid in new_ids[:n]))
    return n / (time.perf_counter() - started)


def seed(connect: Callable[[], Any], n: int, placeholder: str) -> list[str]:
    conn = connect()
    for statement in SCHEMA:
        conn.execute(statement)
    ids = [uuid.uuid4().hex for _ in range(n)]
    conn.cursor().executemany(
        f"INSERT INTO t_orders (id, version) VALUES ({placeholder}, 0)", [(i,) for i in ids]
    )
    conn.commit()
    conn.close()
    return ids


async def writer_thread(
    backend: Backend, qmark: bool, n: int, concurrency: int, ids: list[str]
) -> float:
    committer = Committer(backend)

    async def write(oid: str, seq: int) -> None:
        await committer.submit(partial(_write, qmark, oid, seq))

    try:
        return await orders_per_second(n, concurrency, ids, write)
    finally:
        await asyncio.to_thread(committer.close)


def sqlite_backend(path: str) -> Backend:
    def connect() -> Any:
        conn = sqlite3.connect(path, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    return Backend(connect, "BEGIN IMMEDIATE", (sqlite3.Error,), lambda e: e, lambda c: False,
                   lambda c: c.close())  # fmt: skip


def pg_backend(dsn: str) -> Backend:
    return Backend(lambda: psycopg.connect(dsn), None, (psycopg.Error,), lambda e: e,
                   lambda c: bool(c.closed), lambda c: c.close())  # fmt: skip


async def pg_pool(dsn: str, n: int, concurrency: int, ids: list[str]) -> float:
    from psycopg_pool import AsyncConnectionPool

    async with AsyncConnectionPool(dsn, min_size=concurrency, max_size=concurrency) as pool:

        async def write(oid: str, seq: int) -> None:
            async with pool.connection() as conn, conn.transaction():
                cur = await conn.execute(UPDATE, [seq, oid, seq - 1])
                assert cur.rowcount == 1
                await conn.execute(INSERT, [oid, seq])

        return await orders_per_second(n, concurrency, ids, write)


async def pg_shared(dsn: str, n: int, concurrency: int, ids: list[str]) -> float:
    """Group commit on the loop: one AsyncConnection, writes queued while one commits."""
    conn = await psycopg.AsyncConnection.connect(dsn)
    queue: list[tuple[str, int, asyncio.Future[None]]] = []
    wake = asyncio.Event()

    async def committer() -> None:
        while True:
            await wake.wait()
            wake.clear()
            batch, queue[:] = list(queue), []
            async with conn.transaction():
                for oid, seq, _ in batch:
                    await conn.execute(UPDATE, [seq, oid, seq - 1])
                    await conn.execute(INSERT, [oid, seq])
            for *_, done in batch:
                done.set_result(None)

    task = asyncio.create_task(committer())

    async def write(oid: str, seq: int) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append((oid, seq, done))
        wake.set()
        await done

    try:
        return await orders_per_second(n, concurrency, ids, write)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await conn.close()


async def aiosqlite_rate(path: str, n: int, concurrency: int, ids: list[str]) -> float:
    import aiosqlite

    conns = []
    for _ in range(concurrency):
        conn = await aiosqlite.connect(path, timeout=30, isolation_level=None)
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute("PRAGMA synchronous=NORMAL")
        conns.append(conn)
    free: asyncio.Queue[Any] = asyncio.Queue()
    for conn in conns:
        free.put_nowait(conn)

    async def write(oid: str, seq: int) -> None:
        conn = await free.get()
        try:
            await conn.execute("BEGIN IMMEDIATE")
            cur = await conn.execute(UPDATE.replace("%s", "?"), [seq, oid, seq - 1])
            assert cur.rowcount == 1
            await conn.execute(INSERT.replace("%s", "?"), [oid, seq])
            await conn.commit()
        finally:
            free.put_nowait(conn)

    try:
        return await orders_per_second(n, concurrency, ids, write)
    finally:
        for conn in conns:
            await conn.close()


def pg_scratch(server: str) -> str:
    with psycopg.connect(f"{server}/test", autocommit=True) as admin:
        admin.execute("DROP DATABASE IF EXISTS order_saga_driver_bench WITH (FORCE)")
        admin.execute("CREATE DATABASE order_saga_driver_bench")
    return f"{server}/order_saga_driver_bench"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=400)
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432")
    args = parser.parse_args()
    n = args.orders
    print(f"| driver | database | 1 at once | 16 at once | 64 at once |  ({STEPS} commits/order)")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:

        def fresh_sqlite() -> tuple[str, list[str]]:
            path = f"{tmp}/{uuid.uuid4().hex}.db"
            return path, seed(lambda: sqlite3.connect(path), n, "?")

        def fresh_pg() -> tuple[str, list[str]]:
            dsn = pg_scratch(args.pg)
            return dsn, seed(lambda: psycopg.connect(dsn), n, "%s")

        kinds: list[tuple[str, str, Callable[[], tuple[str, list[str]]], Any]] = [
            ("writer thread (fsm.committer)", "SQLite", fresh_sqlite,
             lambda p, c, ids: writer_thread(sqlite_backend(p), True, n, c, ids)),
            ("aiosqlite, connection per order", "SQLite", fresh_sqlite,
             lambda p, c, ids: aiosqlite_rate(p, n, c, ids)),
            ("writer thread (fsm.committer)", "PostgreSQL", fresh_pg,
             lambda p, c, ids: writer_thread(pg_backend(p), False, n, c, ids)),
            ("psycopg async, connection per order", "PostgreSQL", fresh_pg,
             lambda p, c, ids: pg_pool(p, n, c, ids)),
            ("psycopg async, one shared connection", "PostgreSQL", fresh_pg,
             lambda p, c, ids: pg_shared(p, n, c, ids)),
        ]  # fmt: skip
        for name, database, fresh, run in kinds:
            figures = []
            for concurrency in (1, 16, 64):
                where, ids = fresh()
                figures.append(asyncio.run(run(where, concurrency, ids)))
            print(f"| {name} | {database} | " + " | ".join(f"{f:,.0f}" for f in figures) + " |")


if __name__ == "__main__":
    main()
