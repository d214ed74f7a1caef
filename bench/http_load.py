"""`POST /orders` end to end over HTTP: `order-saga serve --no-sweep` in one process, the
reference services (`order-saga services`) in another, and this process as the load
generator (aiohttp) at 1, 8 and 32 concurrent clients, on SQLite and PostgreSQL.

Beside orders/s and latencies, each level prints serve's own CPU per completed order
(user + sys from /proc, any forked children included), and a row per database sets the
32-client figure against the engine's in-process CPU per order at 16 at once with the
fake services, measured in the same run (issue 20: ≤ 2.5×). On SQLite, 32 clients once more
with `serve --workers 2`: orders/s with every core against the raw loop (issue 20: ≥ 35 %).

Each level runs for a fixed time; each client posts one order after the other. A request
counts as done when it answers 201 with the order completed; anything else (202, 4xx,
5xx, a timeout) is an error. Latencies are of the completed orders only.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp

from bench import engine
from bench.common import BUYER, Config, Row, pg_admin_dsn, serving
from bench.meter import Meter, process_tree

LEVELS = (1, 8, 32)


@dataclass
class Load:
    wall: float = 0.0
    latencies: list[float] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)

    def ms(self, p: int) -> float:
        if len(self.latencies) < 2:
            return float("nan")
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[p - 1]

    def percentile(self, p: int) -> str:
        return "-" if len(self.latencies) < 2 else f"{self.ms(p):,.0f}"

    @property
    def per_second(self) -> float:
        return len(self.latencies) / self.wall if self.wall else 0.0

    def errors(self) -> str:
        errors = sum(self.failures.values())
        return f"{errors} errors {dict(self.failures)}" if errors else "no errors"


@dataclass
class Run:
    """One load against one server: what the clients saw, the server's CPU per completed
    order (ms; its forked children included) and the meter (for `limit`, `where`)."""

    load: Load
    cpu_ms: float
    meter: Meter
    commits: float = float("nan")  # PostgreSQL transactions committed per order, if counted

    def figures(self) -> str:
        r = self.load
        return (
            f"{r.per_second:,.0f} orders/s; p50 {r.percentile(50)} ms, p99 {r.percentile(99)} ms"
            f" (p99/p50 {r.ms(99) / r.ms(50):.1f}×); {self.cpu_ms:.2f} ms CPU/order"
        )


def drive_server(
    server: subprocess.Popen[bytes],
    base: str,
    clients: int,
    seconds: float,
    *,
    headers: dict[str, str] | None = None,
    **others: int,
) -> Run:
    """`clients` closed-loop clients against `base` for `seconds` (sending `headers`, e.g.
    a key), metering the server (and its children, as `server0`, `server1`...) and the
    `others` processes."""
    meter = Meter(**process_tree("server", server.pid), **others)
    result = asyncio.run(load(base, clients, seconds, headers=headers))
    meter.stop()
    done = len(result.latencies)
    cpu = sum(v for k, v in meter.used.items() if k.startswith("server"))
    return Run(result, cpu * 1000 / done if done else float("nan"), meter)


async def load(
    base: str, clients: int, seconds: float, *, headers: dict[str, str] | None = None
) -> Load:
    """`clients` keep-alive connections posting orders back to back for `seconds`. The
    generator is aiohttp, the cheapest Python client, so that most of the 2 cores go to
    what is measured (httpx's own pool costs several times its CPU per request)."""
    result = Load()
    timeout = aiohttp.ClientTimeout(total=30.0)
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(
        base, connector=connector, timeout=timeout, headers=headers
    ) as client:
        stop = time.monotonic() + seconds

        async def one_client() -> None:
            while time.monotonic() < stop:
                began = time.perf_counter()
                try:
                    async with client.post("/orders", json=BUYER) as response:
                        status, body = response.status, await response.json()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    result.failures[type(exc).__name__] += 1
                    continue
                if status == 201 and body.get("status") == "completed":
                    result.latencies.append((time.perf_counter() - began) * 1000)
                else:
                    result.failures[str(status)] += 1

        start = time.monotonic()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        result.wall = time.monotonic() - start
    return result


def measure(cfg: Config, kind: str, seconds: float) -> list[tuple[int, Run, str]]:
    results = []
    with serving(cfg, kind, "http") as up:
        asyncio.run(load(up.base, 2, min(2.0, seconds)))  # warm-up: connections, caches
        for clients in LEVELS:
            run = drive_server(up.serve, up.base, clients, seconds, services=up.services.pid)
            meter = run.meter
            limit = meter.limit(meter.cores("server"), waits_on="commit latency / services")
            cpu = meter.where(serve=("server",), services=("services",), generator=())
            results.append((clients, run, f"{limit}; {cpu}"))
    return results


def target(kind: str, clients: int) -> str:
    if clients != 32:
        return ""
    issue20 = "≥ 35% of raw (one process), p99 ≤ 2× p50" if kind == "sqlite" else "p99 ≤ 2× p50"
    return f"issue 8: ≥ 150 orders/s, p99 < 300 ms, no errors; issue 20: {issue20}"


def every_core(cfg: Config, seconds: float, raw: float, one: Run) -> Row:
    """32 clients on SQLite with `serve --workers 2`, beside one process: orders/s with
    every core (issue 20) against the raw sqlite loop."""
    clients = LEVELS[-1]
    run = serve_once(cfg, "sqlite", seconds, clients=clients, serve_args=("--workers", "2"))
    result = run.load
    # Two processes: CPU-bound only near two cores (bench.http_workers likewise).
    limit = run.meter.limit(
        run.meter.cores("server"), waits_on="commit latency / services", cap=2.0
    )
    cpu = run.meter.where(serve=("server",), services=("services",), generator=())
    return Row(
        what=f"`POST /orders` over HTTP, `serve --workers 2`, sqlite, {clients} clients, "
        f"{seconds:.0f} s ({len(result.latencies):,} orders, {result.errors()})",
        value=f"{run.figures()}; one process above: {one.load.per_second:,.0f} orders/s",
        reference=f"raw sqlite loop {raw:,.0f} orders/s" if raw else "",
        ratio=f"{result.per_second / raw:.0%}" if raw else "",
        target="issue 20: ≥ 35% of raw (every core), p99 ≤ 2× p50",
        limit=f"{limit}; {cpu}",
    )


def run(cfg: Config, references: dict[str, float]) -> list[Row]:
    seconds = cfg.seconds(10, 3)
    rows = []
    for kind in cfg.databases():
        raw = references.get(kind, 0.0)
        measured = measure(cfg, kind, seconds)
        for clients, run, notes in measured:
            result = run.load
            references[f"http-{clients}-{kind}"] = result.per_second  # bench.events: beside
            rows.append(
                Row(
                    what=f"`POST /orders` over HTTP, {kind}, {clients} client"
                    f"{'s' if clients > 1 else ''}, "
                    f"{seconds:.0f} s ({len(result.latencies):,} orders, {result.errors()})",
                    value=run.figures(),
                    reference=f"raw {kind} loop {raw:,.0f} orders/s" if raw else "",
                    ratio=f"{result.per_second / raw:.0%}" if raw else "",
                    target=target(kind, clients),
                    limit=notes,
                )
            )
        top = measured[-1][1]
        if kind == "sqlite":
            rows.append(every_core(cfg, seconds, raw, top))
        engine_ms = engine.cpu_reference(cfg, kind, references)
        rows.append(
            Row(
                what=f"`serve` CPU per order over HTTP, {kind}, {LEVELS[-1]} clients, services "
                "in another process (user+sys from /proc)",
                value=f"{top.cpu_ms:.2f} ms",
                reference=f"engine in-process, 16 at once, fake services: {engine_ms:.2f} ms",
                ratio=f"{top.cpu_ms / engine_ms:.2f}×" if engine_ms > 0 else "-",
                target="≤ 2.5×",
                limit="serve's own work per order: inbound HTTP, 4 outgoing calls, logging",
            )
        )
    return rows


def serve_once(
    cfg: Config, kind: str, seconds: float, *, clients: int = 32, serve_args: tuple[str, ...] = ()
) -> Run:
    """One fresh database, fresh reference services and a fresh `serve --no-sweep
    *serve_args`, a short warm-up, then `clients` clients for `seconds`: for phases that
    set serve beside something else (another process count, another system), round-robin."""
    with serving(cfg, kind, "serve", *serve_args) as up:
        asyncio.run(load(up.base, 2, min(2.0, seconds)))
        before = pg_commits(cfg, up.url)
        run = drive_server(up.serve, up.base, clients, seconds, services=up.services.pid)
        if (
            before is not None
            and (after := pg_commits(cfg, up.url)) is not None
            and run.load.latencies
        ):
            run.commits = (after - before) / len(run.load.latencies)
        return run


def pg_commits(cfg: Config, url: str) -> int | None:
    """Transactions committed in the PostgreSQL database of `url` so far (pg_stat_database,
    after the second PostgreSQL takes to publish its counters); None on SQLite. How many
    orders share a commit: group commit's batching, which more processes split."""
    if not url.startswith("postgresql") or cfg.pg_server is None:
        return None
    import psycopg

    time.sleep(1.1)
    query = "SELECT xact_commit FROM pg_stat_database WHERE datname = %s"
    with psycopg.connect(pg_admin_dsn(cfg.pg_server), connect_timeout=5) as conn:
        row = conn.execute(query, (url.rsplit("/", 1)[1],)).fetchone()
    return int(row[0]) if row else None


def median_run(runs: list[Run]) -> tuple[float, float, float, float]:
    """(orders/s, p50 ms, p99 ms, CPU ms per order), each the median over `runs`."""
    return (
        statistics.median(r.load.per_second for r in runs),
        statistics.median(r.load.ms(50) for r in runs),
        statistics.median(r.load.ms(99) for r in runs),
        statistics.median(r.cpu_ms for r in runs),
    )


def shown(runs: list[Run]) -> str:
    """'123 orders/s; p50 .. ms, p99 .. ms; 4.56 ms CPU/order', medians, reps after."""
    rate, p50, p99, cpu = median_run(runs)
    text = f"{rate:,.0f} orders/s; p50 {p50:,.0f} ms, p99 {p99:,.0f} ms; {cpu:.2f} ms CPU/order"
    if len(runs) > 1:
        text += (
            " (reps: "
            + ", ".join(f"{r.load.per_second:,.0f}/s {r.cpu_ms:.2f} ms" for r in runs)
            + ")"
        )
    return text
