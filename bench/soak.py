"""`python -m bench.soak [--minutes 10] [--retention 60]`: the database size of a soak with
retention on (issue 22). `order-saga serve` on SQLite with ORDER_SAGA_RETENTION_SECONDS,
8 clients posting orders back to back; the file's size (after a WAL checkpoint) printed
every minute, so one can see it level off instead of growing."""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from sqlalchemy import create_engine

from bench.common import (
    Config,
    Processes,
    free_port,
    saga_argv,
    saga_env,
    start_services,
    wait_http,
)
from bench.http_load import load


def size(path: Path) -> int:
    engine = create_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
    finally:
        engine.dispose()
    wal = Path(f"{path}-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--minutes", type=int, default=10)
    parser.add_argument("--retention", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="order-saga-soak-") as tmp:
        cfg = Config(tmp=Path(tmp), pg_server=None)
        db = Path(tmp) / "soak.db"
        with Processes(cfg) as procs:
            _, services_url = start_services(procs)
            port = free_port()
            env = saga_env(
                f"sqlite:///{db}",
                services_url,
                ORDER_SAGA_RETENTION_SECONDS=str(args.retention),
                ORDER_SAGA_RETENTION_INTERVAL="10",
            )
            serve = procs.start("serve", saga_argv("serve", "--port", str(port)), env)
            base = f"http://127.0.0.1:{port}"
            wait_http(procs, serve, f"{base}/healthz")
            began, total = time.monotonic(), 0
            print("| minute | orders so far | database size |\n|---|---|---|", flush=True)
            for minute in range(1, args.minutes + 1):
                done = asyncio.run(load(base, args.clients, 60.0))
                total += len(done.latencies)
                print(f"| {minute} | {total:,} | {size(db) / 2**20:,.1f} MiB |", flush=True)
            print(f"\n{total:,} orders in {(time.monotonic() - began) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
