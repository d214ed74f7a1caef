"""The hot path's statement on the partitioned log against the plain one (issue 22), same
run, alternating: `python -m bench.partition_ab [--orders N] [--rounds R] [--days D]`.

Two scratch PostgreSQL databases, one at revision 0006 (the plain `transitions`: a serial
id key, a foreign key to `orders`, a unique (order_id, seq), order_id and created_at
indexes) and one at head (partitioned by day on `order_created_at`: key (id,
order_created_at), unique (order_id, seq, order_created_at), the created_at index; D past
day partitions added, as a retention of D days keeps). Each round drives N fresh orders
through ten guarded moves — the engine's `WITH moved AS (UPDATE orders ...) INSERT INTO
transitions ...` statement, prepared, 16 to a commit as the group commit does — first on
one database, then on the other (the order swapped each round). Printed: the median
seconds per move of each and their ratio. `synchronous_commit` is off in both sessions so
that the fsync of the commit, the same for both, does not drown what the table costs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import create_engine

from bench.common import Config, scratch_database
from fsm import partitions
from fsm.migrate import upgrade

_ORDER = (
    "INSERT INTO orders (id, user_id, product_id, quantity, state, status, payment_state, "
    "inventory_state, shipping_state, version, lease_owner, attempts, cancel_requested, "
    "created_at, updated_at, machine_version, created_by) VALUES "
    "(%s, 1, 1, 1, 'pending', 'pending', 'pending', 'pending', 'pending', 0, 'ab', '{}', "
    "false, %s, %s, '', '')"
)
_MOVE = (
    "WITH moved AS (UPDATE orders SET version = %s, updated_at = %s "
    "WHERE id = %s AND version = %s AND lease_owner = 'ab' RETURNING id) "
    "INSERT INTO transitions (order_id, seq, scope, trigger, from_state, to_state, detail, "
    "created_at, machine_version{extra}) SELECT %s, %s, 'order', 'go', 'a', 'b', NULL, %s, ''"
    "{marks} FROM moved"
)


def _round(conn: psycopg.Connection[Any], orders: int, *, partitioned: bool) -> float:
    """Seconds per move over `orders` orders of ten moves each."""
    move = _MOVE.format(
        extra=", order_created_at" if partitioned else "", marks=", %s" if partitioned else ""
    )
    created = datetime.now(UTC)
    ids = [uuid.uuid4() for _ in range(orders)]
    with conn.cursor() as cur:
        cur.executemany(_ORDER, [(i, created, created) for i in ids])
    conn.commit()
    began = time.perf_counter()
    pending = 0
    with conn.cursor() as cur:
        for seq in range(1, 11):
            for oid in ids:
                now = datetime.now(UTC)
                params: tuple[Any, ...] = (seq, now, oid, seq - 1, oid, seq, now)
                cur.execute(move, (*params, created) if partitioned else params, prepare=True)
                pending += 1
                if pending == 16:
                    conn.commit()
                    pending = 0
    conn.commit()
    return (time.perf_counter() - began) / (orders * 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--days", type=int, default=90, help="past day partitions to add")
    args = parser.parse_args()
    cfg = Config(tmp=Path(tempfile.gettempdir()))
    with (
        scratch_database(cfg, "postgresql", "plain") as plain_url,
        scratch_database(cfg, "postgresql", "parted") as parted_url,
    ):
        upgrade(plain_url, "0006")
        upgrade(parted_url)
        engine = create_engine(parted_url)
        with engine.connect() as conn:  # a retention of `days`: that many partitions
            partitions.ensure(conn, first=(datetime.now(UTC) - timedelta(days=args.days)).date())
        engine.dispose()
        conns = {
            name: psycopg.connect(url.replace("postgresql+psycopg", "postgresql"))
            for name, url in (("plain", plain_url), ("partitioned", parted_url))
        }
        try:
            for conn in conns.values():
                conn.execute("SET synchronous_commit = off")
                conn.commit()
            seconds: dict[str, list[float]] = {name: [] for name in conns}
            for r in range(args.rounds):
                order = ["plain", "partitioned"] if r % 2 == 0 else ["partitioned", "plain"]
                for name in order:
                    took = _round(conns[name], args.orders, partitioned=name == "partitioned")
                    seconds[name].append(took)
        finally:
            for conn in conns.values():
                conn.close()
    plain, parted = (statistics.median(seconds[n]) for n in ("plain", "partitioned"))
    print(f"moves per round: {args.orders * 10:,}, rounds: {args.rounds}, alternating; ")
    print(f"partitioned log with {args.days} past days + {partitions.AHEAD + 1} ahead")
    print(f"plain log (revision 0006):  {plain * 1e6:7.0f} µs per move (median of rounds)")
    print(f"partitioned log (head):     {parted * 1e6:7.0f} µs per move (median of rounds)")
    print(f"partitioned / plain:        {parted / plain:.2f}×")
    for name in ("plain", "partitioned"):
        print(f"  {name}: " + ", ".join(f"{s * 1e6:.0f}" for s in seconds[name]))


if __name__ == "__main__":
    main()
