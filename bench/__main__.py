"""`python -m bench` (`make bench`): run every benchmark of issue 8 §5 and print one markdown
table, each figure beside its reference, the issue's target and the limit it is near.

    python -m bench                 # full counts (~15 min at most: every phase has a deadline)
    python -m bench --quick         # small counts, to check the harness (~3 min)
    python -m bench --only engine,http --pg postgresql+psycopg://user@host:5432
    python -m bench --no-pg         # SQLite figures only

A phase that fails prints its error in its row and the others still run; child processes
and scratch PostgreSQL databases are removed at the end whatever happened.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

from bench import (
    dbos_peer,
    engine,
    events,
    heatmap,
    http_auth,
    http_load,
    http_workers,
    retention,
    rss,
    sweep,
    workers,
)
from bench.common import (
    DEFAULT_PG,
    Config,
    Row,
    drop_scratch,
    hide,
    pg_admin_dsn,
    pg_reachable,
)

# "engine" measures the raw loops too (each right before the engine on its database);
# "raw" alone is for runs that want only the references (http and sweep need them).
PHASES = (
    "raw",
    "engine",
    "workers",
    "http",
    "http-workers",
    "http-auth",
    "events",
    "dbos",
    "sweep",
    "rss",
    "retention",
    "heatmap",
)
NEEDS_RAW = {"http", "sweep"}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f"{kib / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        memory = "RAM unknown"
    return f"{platform.node()}, {cpu}, {len(os.sched_getaffinity(0))} cores, {memory}"


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def pg_version(server: str | None) -> str:
    if server is None:
        return "PostgreSQL skipped"
    import psycopg

    try:
        with psycopg.connect(pg_admin_dsn(server), connect_timeout=5) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            sync = conn.execute("SHOW synchronous_commit").fetchone()
    except psycopg.Error as exc:
        return f"PostgreSQL ? ({type(exc).__name__})"
    return f"PostgreSQL {row[0] if row else '?'} (synchronous_commit={sync[0] if sync else '?'})"


def table(rows: list[Row]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [
        "| what | figure | reference | ratio | target | near which limit |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = (r.what, r.value, r.reference, r.ratio, r.target, r.limit)
        lines.append("| " + " | ".join(cell(c) for c in cells) + " |")
    return "\n".join(lines)


def _terminate(signum: int, _frame: Any) -> NoReturn:
    raise SystemExit(128 + signum)  # unwinds through every `finally`: children, databases


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts: check the harness")
    parser.add_argument("--only", default=",".join(PHASES), help=f"comma list of {PHASES}")
    parser.add_argument("--pg", default=DEFAULT_PG, help="PostgreSQL server URL (no database)")
    parser.add_argument("--no-pg", action="store_true", help="skip the PostgreSQL figures")
    args = parser.parse_args()
    chosen = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(chosen) - set(PHASES))
    if unknown:
        parser.error(f"--only: unknown {unknown}; choose from {', '.join(PHASES)}")
    chosen = [p for p in PHASES if p in chosen]  # always in this order: references first
    if "engine" in chosen and "raw" in chosen:
        chosen.remove("raw")  # the engine phase measures them
    elif NEEDS_RAW & set(chosen) and "raw" not in chosen and "engine" not in chosen:
        chosen.insert(0, "raw")  # their ratios need the raw loops of the same run
    signal.signal(signal.SIGTERM, _terminate)

    began, load_before = time.monotonic(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="order-saga-bench-") as tmp:
        cfg = Config(tmp=Path(tmp), quick=args.quick, pg_server=None if args.no_pg else args.pg)
        if cfg.pg_server and (reason := pg_reachable(cfg.pg_server)):
            print(f"PostgreSQL unreachable, its figures are skipped: {reason}", file=sys.stderr)
            cfg.pg_server, cfg.pg_skip_reason = None, f"PostgreSQL unreachable: {reason}"
        elif args.no_pg:
            cfg.pg_skip_reason = "--no-pg"
        references: dict[str, float] = {}

        runners: dict[str, Callable[[], list[Row]]] = {
            "raw": lambda: engine.run(cfg, references, engine=False),
            "engine": lambda: engine.run(cfg, references),
            "workers": lambda: workers.run(cfg),
            "http": lambda: http_load.run(cfg, references),
            "http-workers": lambda: http_workers.run(cfg),
            "http-auth": lambda: http_auth.run(cfg),
            "events": lambda: events.run(cfg, references),
            "dbos": lambda: dbos_peer.run(cfg),
            "sweep": lambda: sweep.run(cfg, references),
            "rss": lambda: rss.run(cfg),
            "retention": lambda: retention.run(cfg),
            "heatmap": lambda: heatmap.run(cfg),
        }
        rows: list[Row] = []
        try:
            for phase in chosen:
                start = time.monotonic()
                print(f"[{time.monotonic() - began:5.0f}s] {phase} ...", file=sys.stderr)
                try:
                    rows += runners[phase]()
                except Exception as exc:  # one phase failing must not lose the others
                    traceback.print_exc(file=sys.stderr)
                    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                    rows.append(Row(what=phase, value=f"FAILED: {type(exc).__name__}: {line}"))
                print(f"        {phase} took {time.monotonic() - start:.0f}s", file=sys.stderr)
        finally:
            for name in list(cfg.scratch):
                drop_scratch(cfg, name)
        total = time.monotonic() - began
        print(f"# order-saga benchmarks{' (--quick: small counts)' if args.quick else ''}\n")
        print(f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, commit {commit()}")
        print(f"- machine: {machine()}")
        print(
            f"- Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
            f"{pg_version(cfg.pg_server)}"
            + (f" at {hide(cfg.pg_server)}" if cfg.pg_server else f" ({cfg.pg_skip_reason})")
        )
        print(f"- command: python -m bench {' '.join(sys.argv[1:])}".rstrip())
        print(
            f"- load average (1 min) at start {load_before:.1f}, at end {os.getloadavg()[0]:.1f}"
            " (other processes on the machine count too)"
        )
        print(f"- took {total / 60:.1f} min\n")
        print(table(rows))


if __name__ == "__main__":
    main()
