"""Helpers for the crash and racing tests: run `order-saga` in real subprocesses, inject
faults, wait out a dead driver's lease, and check that money, stock and shipments were
conserved and every effect applied at most once.

Also a tiny CLI the console script lacks: `python -m tests.crashkit cancel [--order] <order-id>`
builds the executor exactly as `order-saga resume` does (same ORDER_SAGA_* settings,
including ORDER_SAGA_CRASH_AFTER) and cancels that completed order. Must not import
`tests.conftest` at run time (the subprocess has no pytest).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from fsm.models import Order
    from fsm.store import Store
    from tests.conftest import Downstream

REPO = Path(__file__).resolve().parent.parent
ORDER_SAGA = str(Path(sys.executable).with_name("order-saga"))
FORWARD_ACTIONS = {"payment": "deduct", "inventory": "deduct", "shipping": "schedule"}
COMPENSATIONS = {"payment": "refund", "inventory": "restore", "shipping": "cancel"}
SUBPROCESS_TIMEOUT = 60.0


# -- running the saga in another process ----------------------------------------------


def saga_env(*, database_url: str, services_url: str, **settings: object) -> dict[str, str]:
    """A clean environment for `order-saga`: no ORDER_SAGA_* leaks in from the caller;
    `settings` are Settings field names (lease_seconds=1 -> ORDER_SAGA_LEASE_SECONDS=1)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORDER_SAGA_")}
    values: dict[str, object] = {
        "database_url": database_url,
        "product_url": services_url,
        "user_url": services_url,
        "inventory_url": services_url,
        "shipping_url": services_url,
        **settings,
    }
    env.update({f"ORDER_SAGA_{k.upper()}": str(v) for k, v in values.items() if v is not None})
    return env


@dataclass(frozen=True)
class Result:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def explain(self) -> str:
        return (
            f"`{' '.join(self.args)}` exited {self.returncode}\n"
            f"--- stdout\n{self.stdout}--- stderr\n{self.stderr}"
        )


def command(kind: str, *args: str) -> list[str]:
    """`resume`/`worker`/... -> the console script; `cancel` -> this module's helper."""
    if kind == "cancel":
        return [sys.executable, "-m", "tests.crashkit", "cancel", *args]
    return [ORDER_SAGA, kind, *args]


class Saga:
    """One `order-saga` (or helper) process; output goes to files, never to a pipe that
    could fill up while we wait on the other process."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str]) -> None:
        self.argv = tuple(argv)
        self._out: IO[bytes] = tempfile.TemporaryFile()
        self._err: IO[bytes] = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            self.argv, env=dict(env), cwd=REPO, stdout=self._out, stderr=self._err
        )

    def wait(self, timeout: float = SUBPROCESS_TIMEOUT) -> Result:
        """The finished process's result; one that hangs is killed and fails the test (its
        -9 must never pass for a crash the test asked for)."""
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            hung = Result(self.argv, -9, self._read(self._out), self._read(self._err))
            raise AssertionError(f"still running after {timeout}s: {hung.explain()}") from None
        return Result(self.argv, code, self._read(self._out), self._read(self._err))

    def stop(self) -> Result:
        if self.process.poll() is None:
            self.process.terminate()
        return self.wait(timeout=15)

    @staticmethod
    def _read(file: IO[bytes]) -> str:
        file.seek(0)
        text = file.read().decode(errors="replace")
        file.close()
        return text


def run_saga(
    kind: str, *args: str, env: Mapping[str, str], timeout: float = SUBPROCESS_TIMEOUT
) -> Result:
    return Saga(command(kind, *args), env).wait(timeout)


async def drive_here(
    kind: str,
    order_id: uuid.UUID,
    *,
    database_url: str,
    services_url: str,
    settings: Mapping[str, Any],
) -> str:
    """`resume --order` / `cancel` in this process, wired like the CLI (never crashes):
    the cheap way to set the stage before the run that is killed. Returns the state."""
    from fsm.settings import Settings
    from fsm.wiring import open_saga

    urls = {f"{name}_url": services_url for name in ("product", "user", "inventory", "shipping")}
    config = Settings(**{"database_url": database_url, **urls, **settings})

    async with open_saga(config) as saga:
        run = saga.executor.cancel if kind == "cancel" else saga.executor.run
        return (await run(order_id)).state


# -- the reference services -------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """One entry for `POST /_faults` (SPEC §4)."""

    operation: str
    mode: str
    count: int = 1000
    seconds: float | None = None


def set_faults(services_url: str, faults: Iterable[Fault]) -> None:
    """Replace the pending faults with `faults`."""
    httpx.delete(f"{services_url}/_faults").raise_for_status()
    for fault in faults:
        body = {"operation": fault.operation, "mode": fault.mode, "count": fault.count}
        if fault.seconds is not None:
            body["seconds"] = fault.seconds
        httpx.post(f"{services_url}/_faults", json=body).raise_for_status()


# -- the database ---------------------------------------------------------------------


def wait_for_lease_expiry(store: Store, order_id: uuid.UUID, *, limit: float = 30.0) -> None:
    """A SIGKILLed driver cannot release its lease: sleep until it has run out."""
    expires = store.get(order_id).lease_expires_at
    if expires is None:
        return
    from fsm.store import utcnow

    remaining = (expires - utcnow()).total_seconds()
    assert remaining < limit, f"lease of {order_id} runs {remaining:.1f}s more"
    if remaining > -0.05:
        time.sleep(remaining + 0.1)


def stuck_orders(
    store: Store, n: int, *, user_id: int, product_id: int, quantity: int
) -> list[uuid.UUID]:
    """`n` pending, unleased orders: what a crashed API process leaves behind."""

    async def create() -> list[uuid.UUID]:
        made = [
            await store.create_order(user_id=user_id, product_id=product_id, quantity=quantity)
            for _ in range(n)
        ]
        return [order.id for order, _ in made]

    return asyncio.run(create())


def triggers_by_scope(store: Store, order_id: uuid.UUID) -> dict[str, Counter[str]]:
    found: dict[str, Counter[str]] = {}
    for t in store.history(order_id):
        found.setdefault(t.scope, Counter())[t.trigger] += 1
    return found


def in_transaction_elsewhere(database_url: str) -> bool:
    """Does another connection hold an open transaction (a write lock) right now?"""
    if database_url.startswith("sqlite"):
        conn = sqlite3.connect(database_url.removeprefix("sqlite:///"), timeout=0)
        try:
            conn.execute("BEGIN IMMEDIATE")  # WAL: fails only while someone writes
        except sqlite3.OperationalError:
            return True
        finally:
            conn.close()
        return False
    import psycopg

    dsn = database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as pg:
        row = pg.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND backend_type = 'client backend' AND pid <> pg_backend_pid() "
            "AND state <> 'idle'"
        ).fetchone()
    return bool(row and row[0])


def pause_between_transactions(saga: Saga, database_url: str, *, tries: int = 200) -> None:
    """SIGSTOP `saga`, but never while it holds a transaction open: a frozen writer would
    block every other driver (SQLite's write lock, a PostgreSQL row lock)."""
    for _ in range(tries):
        saga.process.send_signal(signal.SIGSTOP)
        time.sleep(0.02)  # let the stop land and the server notice a finished statement
        if not in_transaction_elsewhere(database_url):
            return
        saga.process.send_signal(signal.SIGCONT)
        time.sleep(0.01)
    raise AssertionError("could not catch the driver between two transactions")


# -- invariants -----------------------------------------------------------------------


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
            {p: downstream.stock(p) for p in set(products) if p != 999},
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


# -- `python -m tests.crashkit cancel <id>` ---------------------------------------------


def _cancel(order_id: uuid.UUID) -> int:
    from fsm.wiring import open_saga
    from order_saga.cli import load_settings

    settings = load_settings()

    async def main() -> Any:
        async with open_saga(settings) as saga:
            return await saga.executor.cancel(order_id)

    order = asyncio.run(main())
    print(f"{order.id} {order.state} ({order.status})")
    return 0


def main(argv: Sequence[str]) -> int:
    args = [a for a in argv if a != "--order"]  # `--order ID` as `order-saga resume` takes it
    if len(args) != 2 or args[0] != "cancel":
        print("usage: python -m tests.crashkit cancel [--order] ORDER_ID", file=sys.stderr)
        return 2
    try:
        order_id = uuid.UUID(args[1])
    except ValueError:
        print(f"crashkit: {args[1]!r} is not an order id", file=sys.stderr)
        return 2
    return _cancel(order_id)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
