"""`POST /orders` end to end over HTTP: `order-saga serve --no-sweep` in one process, the
reference services (`order-saga services`) in another, and this process as the load
generator (aiohttp) at 1, 8 and 32 concurrent clients, on SQLite and PostgreSQL.

Each level runs for a fixed time; each client posts one order after the other. A request
counts as done when it answers 201 with the order completed; anything else (202, 4xx,
5xx, a timeout) is an error. Latencies are of the completed orders only.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp

from bench.common import (
    BUYER,
    Config,
    Processes,
    Row,
    free_port,
    saga_argv,
    saga_env,
    scratch_database,
    start_services,
    wait_http,
)
from bench.meter import Meter

LEVELS = (1, 8, 32)


@dataclass
class Load:
    wall: float = 0.0
    latencies: list[float] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)

    def percentile(self, p: int) -> str:
        if len(self.latencies) < 2:
            return "-"
        return f"{statistics.quantiles(self.latencies, n=100, method='inclusive')[p - 1]:,.0f}"


async def load(base: str, clients: int, seconds: float) -> Load:
    """`clients` keep-alive connections posting orders back to back for `seconds`. The
    generator is aiohttp, the cheapest Python client, so that most of the 2 cores go to
    what is measured (httpx's own pool costs several times its CPU per request)."""
    result = Load()
    timeout = aiohttp.ClientTimeout(total=30.0)
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(base, connector=connector, timeout=timeout) as client:
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


def measure(cfg: Config, kind: str, seconds: float) -> list[tuple[int, Load, str]]:
    results = []
    with Processes(cfg) as procs, scratch_database(cfg, kind, "http") as url:
        services, services_url = start_services(procs)
        port = free_port()
        serve = procs.start(
            "serve",
            saga_argv("serve", "--port", str(port), "--no-sweep"),
            saga_env(url, services_url),
        )
        base = f"http://127.0.0.1:{port}"
        wait_http(procs, serve, f"{base}/healthz")
        asyncio.run(load(base, 2, min(2.0, seconds)))  # warm-up: connections, caches
        for clients in LEVELS:
            meter = Meter(serve=serve.pid, services=services.pid)
            result = asyncio.run(load(base, clients, seconds))
            meter.stop()
            limit = meter.limit(meter.cores("serve"), waits_on="commit latency / services")
            cpu = meter.where(serve=("serve",), services=("services",), generator=())
            results.append((clients, result, f"{limit}; {cpu}"))
    return results


def run(cfg: Config, references: dict[str, float]) -> list[Row]:
    seconds = cfg.seconds(10, 3)
    rows = []
    for kind in cfg.databases():
        raw = references.get(kind, 0.0)
        for clients, result, notes in measure(cfg, kind, seconds):
            done = len(result.latencies)
            per_second = done / result.wall if result.wall else 0.0
            errors = sum(result.failures.values())
            shown = f"{errors} errors {dict(result.failures)}" if errors else "no errors"
            rows.append(
                Row(
                    what=f"`POST /orders` over HTTP, {kind}, {clients} client"
                    f"{'s' if clients > 1 else ''}, "
                    f"{seconds:.0f} s ({done:,} orders, {shown})",
                    value=f"{per_second:,.0f} orders/s; p50 {result.percentile(50)} ms, "
                    f"p95 {result.percentile(95)} ms, p99 {result.percentile(99)} ms",
                    reference=f"raw {kind} loop {raw:,.0f} orders/s" if raw else "",
                    ratio=f"{per_second / raw:.0%}" if raw else "",
                    target="≥ 150 orders/s, p99 < 300 ms, no errors" if clients == 32 else "",
                    limit=notes,
                )
            )
    return rows
