"""The engine in-process at 1, 16 and 64 orders at once on SQLite and PostgreSQL, with the
fake services (no HTTP), against the raw loop of the same database measured just before.

Each order is created and driven to `completed` through `bench.engine_api`; an order that
ends anywhere else, or raises, is counted as an error. A fresh database per database kind,
a short warm-up first, then the three concurrency levels in turn on the same engine.
"""

from __future__ import annotations

import asyncio
import time

from bench import engine_api
from bench.common import BUYER, Config, Measured, Row, scratch_database
from bench.fakes import fake_services
from bench.meter import Meter
from bench.raw import measure as measure_raw
from fsm.migrate import upgrade

LEVELS = (1, 16, 64)
TARGETS = {
    ("sqlite", 1): "≥ 25% of raw",
    ("sqlite", 16): "≥ 50% of raw",
    ("postgresql", 16): "≥ 2× raw",
}


async def drive(
    engine: engine_api.Engine, count: int, at_once: int, seconds: float, *, waits_on: str = ""
) -> Measured:
    """`count` orders, `at_once` in flight, no new one started after `seconds`."""
    deadline = time.monotonic() + seconds
    started = done = errors = 0

    async def lane() -> None:
        nonlocal started, done, errors
        while started < count and time.monotonic() < deadline:
            started += 1
            try:
                state = await engine.order(**BUYER)
            except Exception:
                state = "error"
            done += 1
            errors += state != "completed"

    meter = Meter()
    await asyncio.gather(*(lane() for _ in range(at_once)))
    meter.stop()
    limit = meter.limit(meter.cores(), waits_on=waits_on)
    return Measured(
        done, meter.wall, count, errors, limit, cpu_seconds=meter.own, queued_seconds=meter.queued
    )


async def measure(url: str, count: int, seconds: float, waits_on: str) -> dict[int, Measured]:
    async with engine_api.open_engine(url, fake_services()) as engine:
        await drive(engine, max(5, count // 50), 4, seconds)  # warm-up, not counted
        return {
            level: await drive(engine, count, level, seconds, waits_on=waits_on) for level in LEVELS
        }


def cpu_key(kind: str) -> str:
    return f"engine_cpu_ms:{kind}"


def cpu_reference(cfg: Config, kind: str, references: dict[str, float]) -> float:
    """The engine's in-process CPU ms per order at 16 at once on `kind` (fake services): the
    engine phase's figure when it ran in this run, else measured here (a shorter run)."""
    if cpu_key(kind) not in references:
        count, seconds = cfg.n(600, 100), cfg.seconds(15, 5)
        with scratch_database(cfg, kind, "engine-cpu") as url:
            upgrade(url)

            async def one_level() -> Measured:
                async with engine_api.open_engine(url, fake_services()) as engine:
                    await drive(engine, max(5, count // 50), 4, seconds)  # warm-up
                    return await drive(engine, count, 16, seconds)

            references[cpu_key(kind)] = asyncio.run(one_level()).cpu_ms_per_order
    return references[cpu_key(kind)]


def run(cfg: Config, references: dict[str, float], *, engine: bool = True) -> list[Row]:
    """Per database, the raw loop and right after it the engine, so a machine whose load
    drifts during the run still gives a fair ratio. Fills `references` (orders/s of each
    raw loop) for the later phases; `engine=False` measures the raw loops only."""
    count, seconds = cfg.n(1000, 100), cfg.seconds(40, 10)
    rows = []
    for kind in cfg.databases():
        raw_row, raw = measure_raw(cfg, kind)
        references[kind] = raw
        rows.append(raw_row)
        if not engine:
            continue
        waits = "commit latency (WAL write / fsync)"
        with scratch_database(cfg, kind, "engine") as url:
            upgrade(url)
            results = asyncio.run(measure(url, count, seconds, waits))
        references[cpu_key(kind)] = results[16].cpu_ms_per_order
        for level, m in results.items():
            shown = "one order at a time" if level == 1 else f"{level} orders at once"
            ratio = f"{m.per_second / raw:.0%}" if raw else "-"
            if kind == "postgresql" and raw:
                ratio += f" ({m.per_second / raw:.2f}×)"
            rows.append(
                Row(
                    what=f"engine on {kind}, {shown}, fake services ({m.count:,} orders"
                    f"{', ' + str(m.errors) + ' not completed' if m.errors else ''}){m.note()}",
                    value=f"{m.per_second:,.0f} orders/s; {m.cpu_ms_per_order:.2f} ms CPU/order",
                    reference=f"raw {kind} loop {raw:,.0f} orders/s",
                    ratio=ratio,
                    target=TARGETS.get((kind, level), ""),
                    limit=m.limit,
                )
            )
    return rows
