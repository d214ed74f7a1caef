"""State of the reference services: SQLite (a file, or `:memory:`), idempotency and effects.

Every mutation runs in one `BEGIN IMMEDIATE` transaction under one lock and is committed
before its answer leaves; business rules live in `ledger.py`, never here.
"""

import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from downstream import seed

T = TypeVar("T")

SCHEMA: tuple[str, ...] = (
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS users (
        id INTEGER PRIMARY KEY, name TEXT NOT NULL, balance INTEGER NOT NULL,
        address TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS products (
        id INTEGER PRIMARY KEY, category TEXT NOT NULL, description TEXT NOT NULL,
        price INTEGER NOT NULL)""",
    "CREATE TABLE IF NOT EXISTS stock (product_id INTEGER PRIMARY KEY, quantity INTEGER NOT NULL)",
    # What each order has been charged / has reserved and not yet given back.
    """CREATE TABLE IF NOT EXISTS charges (
        order_id TEXT NOT NULL, user_id INTEGER NOT NULL, amount INTEGER NOT NULL,
        PRIMARY KEY (order_id, user_id))""",
    """CREATE TABLE IF NOT EXISTS reservations (
        order_id TEXT NOT NULL, product_id INTEGER NOT NULL, quantity INTEGER NOT NULL,
        PRIMARY KEY (order_id, product_id))""",
    """CREATE TABLE IF NOT EXISTS shipments (
        order_id TEXT PRIMARY KEY, user_id INTEGER NOT NULL, quantity INTEGER NOT NULL,
        status TEXT NOT NULL, expected_delivery TEXT NOT NULL, address TEXT NOT NULL)""",
    # Tombstones: (service, order_id) was compensated; a late forward request is refused.
    """CREATE TABLE IF NOT EXISTS compensations (
        service TEXT NOT NULL, order_id TEXT NOT NULL, PRIMARY KEY (service, order_id))""",
    """CREATE TABLE IF NOT EXISTS requests (
        key TEXT PRIMARY KEY, operation TEXT NOT NULL, request TEXT NOT NULL,
        status_code INTEGER NOT NULL, body TEXT NOT NULL)""",
    "CREATE TABLE IF NOT EXISTS effects (key TEXT PRIMARY KEY, count INTEGER NOT NULL)",
)
TABLES: tuple[str, ...] = (
    "meta",
    "users",
    "products",
    "stock",
    "charges",
    "reservations",
    "shipments",
    "compensations",
    "requests",
    "effects",
)

KEY_REUSED = "idempotency key reused with a different request"


@dataclass(frozen=True)
class Outcome:
    """One answer of a service: what to send back, and whether state changed."""

    status_code: int
    body: dict[str, Any]
    effect: bool = False
    replayed: bool = False


def fail(status_code: int, detail: str) -> Outcome:
    return Outcome(status_code, {"detail": detail})


class Store:
    """The services' state. `path=None` keeps it in memory (fresh seed per instance)."""

    def __init__(self, path: str | None = None) -> None:
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(
            path or ":memory:", check_same_thread=False, isolation_level=None, timeout=30.0
        )
        self._conn.row_factory = sqlite3.Row
        if path:
            self._conn.execute("PRAGMA journal_mode=WAL")
            # In WAL mode NORMAL survives a killed process (not a power cut), which is the
            # failure the orchestrator's crash tests exercise.
            self._conn.execute("PRAGMA synchronous=NORMAL")
        with self.transaction() as conn:
            for statement in SCHEMA:
                conn.execute(statement)
            if conn.execute("SELECT 1 FROM meta WHERE name = 'seeded'").fetchone() is None:
                _seed(conn)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Run the body atomically: the lock for threads, BEGIN IMMEDIATE for processes."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def read(self, query: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            return query(self._conn)

    def mutate(
        self,
        *,
        key: str | None,
        operation: str,
        request: dict[str, Any],
        action: Callable[[sqlite3.Connection], Outcome],
    ) -> Outcome:
        """Execute `action` at most once per idempotency key and remember its answer.

        A repeat of the same key and request returns the stored answer (`replayed`); the
        same key with another operation or body answers 422 and changes nothing.
        """
        fingerprint = json.dumps(request, sort_keys=True, separators=(",", ":"))
        with self.transaction() as conn:
            if key is not None:
                row = conn.execute(
                    "SELECT operation, request, status_code, body FROM requests WHERE key = ?",
                    (key,),
                ).fetchone()
                if row is not None:
                    if (row["operation"], row["request"]) != (operation, fingerprint):
                        return fail(422, KEY_REUSED)
                    return Outcome(row["status_code"], json.loads(row["body"]), replayed=True)
            outcome = action(conn)
            if key is not None:
                conn.execute(
                    "INSERT INTO requests (key, operation, request, status_code, body) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (key, operation, fingerprint, outcome.status_code, json.dumps(outcome.body)),
                )
                if outcome.effect:
                    conn.execute(
                        "INSERT INTO effects (key, count) VALUES (?, 1) "
                        "ON CONFLICT (key) DO UPDATE SET count = count + 1",
                        (key,),
                    )
            return outcome

    def stored_answer(self, key: str) -> dict[str, Any] | None:
        row = self.read(
            lambda conn: conn.execute(
                "SELECT key, operation, status_code, body FROM requests WHERE key = ?", (key,)
            ).fetchone()
        )
        if row is None:
            return None
        return {
            "key": row["key"],
            "operation": row["operation"],
            "status_code": row["status_code"],
            "body": json.loads(row["body"]),
        }

    def effects(self) -> dict[str, int]:
        rows = self.read(
            lambda conn: conn.execute("SELECT key, count FROM effects ORDER BY key").fetchall()
        )
        return {row["key"]: row["count"] for row in rows}

    def reset(self) -> None:
        """Back to the seed: balances, stock, shipments, idempotency records and effects."""
        with self.transaction() as conn:
            for table in TABLES:
                conn.execute(f"DELETE FROM {table}")  # table names come from a literal
            _seed(conn)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _seed(conn: sqlite3.Connection) -> None:
    """Load `seed.py`'s tables; must run inside the caller's transaction."""
    conn.executemany(
        "INSERT INTO users (id, name, balance, address) VALUES (?, ?, ?, ?)", seed.USERS
    )
    conn.executemany(
        "INSERT INTO products (id, category, description, price) VALUES (?, ?, ?, ?)",
        [(p.id, p.category, p.description, p.price) for p in seed.PRODUCTS],
    )
    conn.executemany(
        "INSERT INTO stock (product_id, quantity) VALUES (?, ?)",
        [(p.id, p.stock) for p in seed.PRODUCTS],
    )
    conn.execute("INSERT INTO meta (name, value) VALUES ('seeded', 'yes')")
