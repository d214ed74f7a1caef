"""order-saga against DBOS Transact + FastAPI end to end over HTTP (issue 20), same run.

Both do the same saga over the same reference services (`order-saga services`, a fresh
one per run) with the same idempotency keys: `order-saga serve --no-sweep` and
bench/dbos_app.py (a DBOS async workflow behind FastAPI on uvicorn, uvloop + httptools,
calling the services with aiohttp). The same load generator (`bench.http_load.load`, 32
closed-loop clients) drives each in turn, order-saga then DBOS, `reps` times, each run on a
fresh database: SQLite, and PostgreSQL where DBOS's system database is a scratch database.
Figures: orders/s, p50/p99, and the server's own CPU per completed order (/proc).

DBOS is installed ONLY into .venv-bench (bench/requirements-dbos.txt; `make bench-dbos`, or
this phase when it is missing), never into order-saga's environment. When it cannot be
installed, the rows say so and nothing is measured.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from bench.common import (
    Config,
    Processes,
    Row,
    free_port,
    scratch_database,
    start_services,
    wait_http,
)
from bench.http_load import Run, drive_server, load, median_run, serve_once, shown

HERE = Path(__file__).resolve().parent
VENV = HERE.parent / ".venv-bench"
REQUIREMENTS = HERE / "requirements-dbos.txt"
APP = HERE / "dbos_app.py"
TARGETS = {"sqlite": 6.0, "postgresql": 5.0}  # order-saga's orders/s ÷ DBOS's


class Unavailable(RuntimeError):
    """DBOS could not be installed into the bench environment."""


def ensure_venv() -> Path:
    """.venv-bench's python with bench/requirements-dbos.txt installed: made (or brought up
    to date) when missing or when that file changed since."""
    python, stamp = VENV / "bin" / "python", VENV / ".installed"
    wanted = REQUIREMENTS.read_text()
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python  # the stamp holds what was installed (a checkout moves mtimes)
    print(f"dbos: installing {REQUIREMENTS.name} into {VENV} ...", file=sys.stderr)
    try:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, timeout=300)
        done = subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "-r", str(REQUIREMENTS)],
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        raise Unavailable(f"{type(exc).__name__}: {exc}") from exc
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise Unavailable(f"pip install failed: {' | '.join(lines[-2:])}")
    stamp.write_text(wanted)
    return python


def dbos_version(python: Path) -> str:
    code = "import importlib.metadata as m; print(m.version('dbos'))"
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60)
    return done.stdout.strip() or "?"


def dbos_once(cfg: Config, python: Path, kind: str, seconds: float, clients: int = 32) -> Run:
    with Processes(cfg) as procs, scratch_database(cfg, kind, "dbos") as url:
        services, services_url = start_services(procs)
        system_db = url.replace("postgresql+psycopg://", "postgresql://")
        port = free_port()
        argv = [
            str(python), str(APP), "--port", str(port), "--services", services_url,
            "--system-database", system_db,
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("ORDER_SAGA_")}
        app = procs.start("dbos", argv, env)
        base = f"http://127.0.0.1:{port}"
        wait_http(procs, app, f"{base}/healthz")
        asyncio.run(load(base, 2, min(2.0, seconds)))
        return drive_server(app, base, clients, seconds, services=services.pid)


def run(cfg: Config) -> list[Row]:
    try:
        python = ensure_venv()
    except Unavailable as exc:
        return [Row("DBOS Transact + FastAPI, end to end over HTTP", f"not measured: {exc}")]
    version = dbos_version(python)
    seconds, reps = cfg.seconds(10, 3), 1 if cfg.quick else 2
    rows = []
    for kind in cfg.databases():
        ours: list[Run] = []
        theirs: list[Run] = []
        for _ in range(reps):
            ours.append(serve_once(cfg, kind, seconds))
            theirs.append(dbos_once(cfg, python, kind, seconds))
        rate, _, _, cpu = median_run(ours)
        peer_rate, _, _, peer_cpu = median_run(theirs)
        errors = sum(sum(r.load.failures.values()) for r in theirs)
        failures = {k: v for r in theirs for k, v in r.load.failures.items()}
        meter = theirs[-1].meter
        rows.append(
            Row(
                what=f"DBOS Transact {version} + FastAPI (uvicorn, uvloop + httptools, aiohttp "
                f"to the services), {kind}, 32 clients, {reps}× {seconds:.0f} s, services in "
                f"another process ({errors} errors{' ' + str(failures) if errors else ''})",
                value=shown(theirs),
                limit=meter.limit(meter.cores("server"), waits_on="DBOS's system database")
                + "; "
                + meter.where(dbos=("server",), services=("services",), generator=()),
            )
        )
        errors = sum(sum(r.load.failures.values()) for r in ours)
        rows.append(
            Row(
                what=f"order-saga `serve --no-sweep` vs DBOS + FastAPI, {kind}, 32 clients, "
                f"round-robin with the row above ({errors} errors)",
                value=shown(ours),
                reference=f"DBOS {peer_rate:,.0f} orders/s, {peer_cpu:.2f} ms CPU/order",
                ratio=f"orders/s {rate / peer_rate:.1f}×; CPU/order {peer_cpu / cpu:.1f}× less"
                if peer_rate > 0 and cpu > 0
                else "-",
                target=f"orders/s ≥ {TARGETS[kind]:.0f}× DBOS's",
            )
        )
    return rows


def install() -> None:
    """`python -m bench.dbos_peer` (`make bench-dbos`): make .venv-bench only."""
    try:
        python = ensure_venv()
    except Unavailable as exc:
        raise SystemExit(f"DBOS is not installable here: {exc}") from None
    print(f"{VENV}: DBOS Transact {dbos_version(python)}")


if __name__ == "__main__":
    install()
