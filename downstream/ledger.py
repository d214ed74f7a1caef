"""Business rules of the four reference services, as functions over one SQLite connection.

Each mutation runs inside `Store.mutate`'s transaction and checks everything before it
changes anything, so a business failure (402, 404, 409, 422) never has an effect.
"""

import sqlite3
from datetime import UTC, datetime, timedelta

from downstream.seed import DELIVERY_DAYS, MAX_UNITS_PER_SHIPMENT
from downstream.store import Outcome, fail

# ---- reads -------------------------------------------------------------------------------


def get_product(conn: sqlite3.Connection, product_id: int) -> Outcome:
    row = conn.execute(
        "SELECT id, category, description, price FROM products WHERE id = ?", (product_id,)
    ).fetchone()
    return Outcome(200, dict(row)) if row else fail(404, f"product {product_id} not found")


def get_user(conn: sqlite3.Connection, user_id: int) -> Outcome:
    row = conn.execute(
        "SELECT id, name, balance, address FROM users WHERE id = ?", (user_id,)
    ).fetchone()
    return Outcome(200, dict(row)) if row else fail(404, f"user {user_id} not found")


def get_stock(conn: sqlite3.Connection, product_id: int) -> Outcome:
    row = conn.execute(
        "SELECT product_id, quantity FROM stock WHERE product_id = ?", (product_id,)
    ).fetchone()
    return Outcome(200, dict(row)) if row else fail(404, f"product {product_id} not found")


def get_shipment(conn: sqlite3.Connection, order_id: str) -> Outcome:
    row = conn.execute(
        "SELECT order_id, user_id, quantity, status, expected_delivery, address "
        "FROM shipments WHERE order_id = ?",
        (order_id,),
    ).fetchone()
    return Outcome(200, dict(row)) if row else fail(404, f"no shipment for order {order_id}")


# ---- tombstones: compensation before action ------------------------------------------------


def _compensated(conn: sqlite3.Connection, service: str, order_id: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM compensations WHERE service = ? AND order_id = ?", (service, order_id)
    ).fetchone()
    return row is not None


def _bury(conn: sqlite3.Connection, service: str, order_id: str) -> None:
    conn.execute(
        "INSERT OR IGNORE INTO compensations (service, order_id) VALUES (?, ?)",
        (service, order_id),
    )


def _already_compensated(order_id: str) -> Outcome:
    return fail(409, f"order {order_id} was already compensated")


# ---- user (payment) --------------------------------------------------------------------------


def _balance(conn: sqlite3.Connection, user_id: int) -> int | None:
    row = conn.execute("SELECT balance FROM users WHERE id = ?", (user_id,)).fetchone()
    return None if row is None else int(row["balance"])


def deduct_balance(
    conn: sqlite3.Connection, *, user_id: int, amount: int, order_id: str
) -> Outcome:
    balance = _balance(conn, user_id)
    if balance is None:
        return fail(404, f"user {user_id} not found")
    if _compensated(conn, "user", order_id):
        return _already_compensated(order_id)
    if balance < amount:
        return fail(402, "insufficient balance")
    conn.execute("UPDATE users SET balance = balance - ? WHERE id = ?", (amount, user_id))
    conn.execute(
        "INSERT INTO charges (order_id, user_id, amount) VALUES (?, ?, ?) "
        "ON CONFLICT (order_id, user_id) DO UPDATE SET amount = amount + excluded.amount",
        (order_id, user_id, amount),
    )
    body = {"user_id": user_id, "order_id": order_id, "amount": amount, "balance": balance - amount}
    return Outcome(200, body, effect=True)


def refund_balance(
    conn: sqlite3.Connection, *, user_id: int, amount: int, order_id: str
) -> Outcome:
    """Give back everything still charged to this order (`amount` is not trusted: the ledger
    knows what was taken); nothing charged is a successful no-op, and so is a user this
    service does not have (nothing can have been charged to it: `balance` null). Leaves a
    tombstone either way, so a late deduct for the order is refused."""
    balance = _balance(conn, user_id)
    _bury(conn, "user", order_id)
    if balance is None:
        body = {"user_id": user_id, "order_id": order_id, "refunded": 0, "balance": None}
        return Outcome(200, body)
    row = conn.execute(
        "SELECT amount FROM charges WHERE order_id = ? AND user_id = ?", (order_id, user_id)
    ).fetchone()
    refunded = 0 if row is None else int(row["amount"])
    if refunded:
        conn.execute("UPDATE users SET balance = balance + ? WHERE id = ?", (refunded, user_id))
        conn.execute(
            "UPDATE charges SET amount = 0 WHERE order_id = ? AND user_id = ?", (order_id, user_id)
        )
    body = {
        "user_id": user_id,
        "order_id": order_id,
        "refunded": refunded,
        "balance": balance + refunded,
    }
    return Outcome(200, body, effect=refunded > 0)


# ---- inventory -----------------------------------------------------------------------------


def _stock(conn: sqlite3.Connection, product_id: int) -> int | None:
    row = conn.execute("SELECT quantity FROM stock WHERE product_id = ?", (product_id,)).fetchone()
    return None if row is None else int(row["quantity"])


def deduct_stock(
    conn: sqlite3.Connection, *, product_id: int, quantity: int, order_id: str
) -> Outcome:
    stock = _stock(conn, product_id)
    if stock is None:
        return fail(404, f"product {product_id} not found")
    if _compensated(conn, "inventory", order_id):
        return _already_compensated(order_id)
    if stock < quantity:
        return fail(409, "insufficient stock")
    conn.execute(
        "UPDATE stock SET quantity = quantity - ? WHERE product_id = ?", (quantity, product_id)
    )
    conn.execute(
        "INSERT INTO reservations (order_id, product_id, quantity) VALUES (?, ?, ?) "
        "ON CONFLICT (order_id, product_id) DO UPDATE SET quantity = quantity + excluded.quantity",
        (order_id, product_id, quantity),
    )
    body = {
        "product_id": product_id,
        "order_id": order_id,
        "quantity": quantity,
        "remaining": stock - quantity,
    }
    return Outcome(200, body, effect=True)


def restore_stock(
    conn: sqlite3.Connection, *, product_id: int, quantity: int, order_id: str
) -> Outcome:
    """Put back everything this order still holds; nothing held is a successful no-op, and
    so is a product this service does not stock (nothing can have been reserved:
    `remaining` null). Leaves a tombstone either way, so a late deduct is refused."""
    stock = _stock(conn, product_id)
    _bury(conn, "inventory", order_id)
    if stock is None:
        body = {"product_id": product_id, "order_id": order_id, "restored": 0, "remaining": None}
        return Outcome(200, body)
    row = conn.execute(
        "SELECT quantity FROM reservations WHERE order_id = ? AND product_id = ?",
        (order_id, product_id),
    ).fetchone()
    restored = 0 if row is None else int(row["quantity"])
    if restored:
        conn.execute(
            "UPDATE stock SET quantity = quantity + ? WHERE product_id = ?", (restored, product_id)
        )
        conn.execute(
            "UPDATE reservations SET quantity = 0 WHERE order_id = ? AND product_id = ?",
            (order_id, product_id),
        )
    body = {
        "product_id": product_id,
        "order_id": order_id,
        "restored": restored,
        "remaining": stock + restored,
    }
    return Outcome(200, body, effect=restored > 0)


# ---- shipping ------------------------------------------------------------------------------


def schedule_shipment(
    conn: sqlite3.Connection, *, order_id: str, user_id: int, quantity: int
) -> Outcome:
    if quantity > MAX_UNITS_PER_SHIPMENT:
        return fail(422, f"cannot ship more than {MAX_UNITS_PER_SHIPMENT} units in one shipment")
    user = conn.execute("SELECT address FROM users WHERE id = ?", (user_id,)).fetchone()
    if user is None:
        return fail(422, f"no address for user {user_id}")
    if _compensated(conn, "shipping", order_id):
        return _already_compensated(order_id)
    if conn.execute("SELECT 1 FROM shipments WHERE order_id = ?", (order_id,)).fetchone():
        return fail(409, f"a shipment for order {order_id} is already scheduled")
    expected = (datetime.now(UTC).date() + timedelta(days=DELIVERY_DAYS)).isoformat()
    conn.execute(
        "INSERT INTO shipments (order_id, user_id, quantity, status, expected_delivery, address) "
        "VALUES (?, ?, ?, 'scheduled', ?, ?)",
        (order_id, user_id, quantity, expected, user["address"]),
    )
    body = {
        "order_id": order_id,
        "status": "scheduled",
        "expected_delivery": expected,
        "address": user["address"],
    }
    return Outcome(200, body, effect=True)


def cancel_shipment(conn: sqlite3.Connection, *, order_id: str) -> Outcome:
    """Cancel the order's shipment; never scheduled or already cancelled is a no-op."""
    row = conn.execute("SELECT status FROM shipments WHERE order_id = ?", (order_id,)).fetchone()
    _bury(conn, "shipping", order_id)
    if row is None:
        return Outcome(200, {"order_id": order_id, "status": "not_scheduled"})
    if row["status"] == "cancelled":
        return Outcome(200, {"order_id": order_id, "status": "cancelled"})
    conn.execute("UPDATE shipments SET status = 'cancelled' WHERE order_id = ?", (order_id,))
    return Outcome(200, {"order_id": order_id, "status": "cancelled"}, effect=True)
