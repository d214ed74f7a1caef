"""Benchmarks that print figures (never asserted in tests): the design constraints of the
saga engine, measured as ratios within one run so a noisy 2-core machine still compares.

1. validating a move on the shared machine vs building a `transitions.Machine` per order;
2. the hot path (guarded UPDATE + log INSERT, one transaction) vs a SQLModel session per
   transition, on SQLite and PostgreSQL;
3. whole orders per second through the executor against the reference services (in-process
   ASGI transport, so the figure is the orchestrator's own cost), sequential and 20 at once.

Usage: python bench/throughput.py [--orders N] [--pg URL | --no-pg]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime

import httpx
from sqlmodel import Session, SQLModel
from transitions import Machine

import fsm.models  # noqa: F401
from downstream.app import create_services_app
from fsm.clients import http_services
from fsm.executor import Executor, RetryPolicy
from fsm.machine import ORDER_MACHINE, ORDER_TRANSITIONS, OrderState, next_state
from fsm.models import Order, Transition
from fsm.store import Store, make_engine


def per_call_us(fn: Callable[[], object], n: int) -> float:
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - start) / n * 1e6)
    return statistics.median(samples)


def bench_machine() -> tuple[float, float]:
    shared = per_call_us(lambda: next_state(ORDER_MACHINE, "pending", "request_product"), 2000)

    class Model:
        state = "pending"

    def machine_per_order() -> None:
        model = Model()
        Machine(
            model=model,
            states=[s.value for s in OrderState],
            auto_transitions=False,
            transitions=[
                {
                    "trigger": t.value,
                    "source": [x.value for x in s] if isinstance(s, list) else s.value,
                    "dest": d.value,
                }
                for t, s, d in ORDER_TRANSITIONS
            ],
            initial="pending",
        )
        model.request_product()  # type: ignore[attr-defined]

    per_order = per_call_us(machine_per_order, 300)
    return shared, per_order


def fresh_engine(url: str):  # type: ignore[no-untyped-def]
    engine = make_engine(url)
    SQLModel.metadata.drop_all(engine)
    SQLModel.metadata.create_all(engine)
    return engine


def bench_store(url: str, n: int) -> tuple[float, float]:
    engine = fresh_engine(url)
    store = Store(engine)
    triggers = [
        ("order", "request_product"),
        ("order", "product_found"),
        ("payment", "request"),
        ("inventory", "request"),
        ("shipping", "request"),
        ("payment", "succeed"),
        ("inventory", "succeed"),
        ("shipping", "succeed"),
        ("order", "all_succeeded"),
    ]
    orders = [
        store.create_order(user_id=1, product_id=1, quantity=1, owner="b")[0] for _ in range(n)
    ]
    start = time.perf_counter()
    for order in orders:
        for scope, trigger in triggers:
            store.record_transition(order=order, owner="b", scope=scope, trigger=trigger)
    hot = (time.perf_counter() - start) / (n * len(triggers)) * 1e6

    # The naive way: an ORM session per transition, load, mutate, add the log row, commit.
    orders = [
        store.create_order(user_id=1, product_id=1, quantity=1, owner="b")[0] for _ in range(n)
    ]
    start = time.perf_counter()
    for order in orders:
        for seq, (scope, trigger) in enumerate(triggers, 1):
            with Session(engine) as session:
                row = session.get(Order, order.id)
                assert row is not None
                column = "state" if scope == "order" else f"{scope}_state"
                setattr(row, column, trigger)
                row.version += 1
                session.add(
                    Transition(
                        order_id=order.id,
                        seq=seq,
                        scope=scope,
                        trigger=trigger,
                        from_state="x",
                        to_state=trigger,
                        created_at=datetime.now(UTC),
                    )
                )
                session.commit()
    naive = (time.perf_counter() - start) / (n * len(triggers)) * 1e6
    engine.dispose()
    return hot, naive


async def bench_orders(url: str, n: int, concurrency: int) -> float:
    engine = fresh_engine(url)
    store = Store(engine)
    services_app = create_services_app()
    transport = httpx.ASGITransport(app=services_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
        services = http_services(
            client,
            product_url="http://svc",
            user_url="http://svc",
            inventory_url="http://svc",
            shipping_url="http://svc",
        )
        executor = Executor(store=store, services=services, policy=RetryPolicy())
        gate = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with gate:
                order, _ = store.create_order(
                    user_id=3, product_id=1, quantity=1, owner=executor.owner
                )
                await executor.drive(order)
                assert order.state == "completed", order.state

        start = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        elapsed = time.perf_counter() - start
    services_app.state.store.close()
    engine.dispose()
    return n / elapsed


def pg_database(server: str) -> str:
    """A scratch database `order_saga_bench` on the server (dropped and re-created)."""
    import psycopg

    try:
        with psycopg.connect(server.replace("+psycopg", "") + "/test", autocommit=True) as c:
            c.execute("DROP DATABASE IF EXISTS order_saga_bench WITH (FORCE)")
            c.execute("CREATE DATABASE order_saga_bench")
    except psycopg.OperationalError as exc:
        return f"unreachable: {str(exc).splitlines()[0]}"
    return f"{server}/order_saga_bench"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=200)
    parser.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432")
    parser.add_argument("--no-pg", action="store_true")
    args = parser.parse_args()

    print(
        f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
        f"{platform.processor() or platform.machine()}, Python {platform.python_version()}"
    )
    shared, per_order = bench_machine()
    print(
        f"machine: shared next_state {shared:.1f} µs, Machine per order {per_order:.1f} µs"
        f" (x{per_order / shared:.1f})"
    )

    with tempfile.TemporaryDirectory() as tmp:
        databases = {"sqlite": f"sqlite:///{tmp}/bench.db"}
        if not args.no_pg:
            databases["postgresql"] = pg_database(args.pg)
        for name, url in databases.items():
            if url.startswith("unreachable"):
                print(f"{name}: skipped, {url}")
                continue
            hot, naive = bench_store(url, max(20, args.orders // 4))
            print(
                f"{name}: transition hot path {hot:.0f} µs, session per transition "
                f"{naive:.0f} µs (x{naive / hot:.1f})"
            )
            seq = asyncio.run(bench_orders(url, args.orders, 1))
            par = asyncio.run(bench_orders(url, args.orders, 20))
            print(f"{name}: orders/s sequential {seq:.0f}, 20 concurrent {par:.0f}")


if __name__ == "__main__":
    main()
