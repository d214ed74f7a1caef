"""The recovery sweep over N stuck orders (pending, unleased, last moved an hour ago,
inserted straight into a fresh database made by the migrations), on SQLite and PostgreSQL,
two ways; every order must end completed:

- in-process with the fake services (`bench.engine_api.sweep`, what `resume` runs): the
  engine's own cost, comparable with the engine rows;
- `order-saga resume --limit N --older-than 0` as a process, the reference services in
  another process: end to end, four HTTP calls per order on the same 2 cores.
"""

from __future__ import annotations

import asyncio
import time

from bench import engine_api
from bench.common import (
    Config,
    Processes,
    Row,
    StateCounter,
    insert_waiting_orders,
    migrate,
    outcome,
    saga_argv,
    saga_env,
    scratch_database,
    start_services,
)
from bench.fakes import fake_services
from bench.meter import Meter
from fsm.migrate import upgrade


def in_process(cfg: Config, kind: str, count: int, raw: float) -> Row:
    with scratch_database(cfg, kind, "sweep-in-process") as url:
        upgrade(url)
        insert_waiting_orders(url, count)
        meter = Meter()
        outcomes = asyncio.run(engine_api.sweep(url, fake_services(), count))
        meter.stop()
    limit = meter.limit(meter.cores(), waits_on="commit latency (WAL write / fsync)")
    return Row(
        what=f"recovery sweep in-process over {count:,} stuck orders, {kind}, fake services",
        value=f"{meter.wall:.1f} s ({count / meter.wall:,.0f} orders/s)",
        reference=f"raw {kind} loop: {count / raw:.1f} s for {count:,} orders" if raw else "",
        ratio=f"{count / raw / meter.wall:.0%}" if raw else "",
        target="< 10 s" if count >= 10_000 else "< 10 s at 10,000",
        limit=f"{limit}; {outcome(outcomes)}",
    )


def sweep(cfg: Config, kind: str, count: int, seconds: float, raw: float) -> Row:
    with Processes(cfg) as procs, scratch_database(cfg, kind, "sweep") as url:
        migrate(procs, url)
        insert_waiting_orders(url, count)
        services, services_url = start_services(procs)
        counter = StateCounter(url)
        try:
            argv = saga_argv("resume", "--limit", str(count), "--older-than", "0")
            deadline = time.monotonic() + seconds
            resume = procs.start("resume", argv, saga_env(url, services_url))
            meter = Meter(resume=resume.pid, services=services.pid)
            while resume.poll() is None and time.monotonic() < deadline:
                meter.sample()  # /proc/<pid> is gone once the child has been reaped
                time.sleep(0.05)
            meter.stop()
            wall = meter.wall
            timed_out = resume.poll() is None
            procs.stop(resume)
            states = counter.counts()
        finally:
            counter.close()
        if not timed_out and resume.returncode != 0:
            raise RuntimeError(f"resume exited {resume.returncode}: {procs.log_tail(resume)}")
    completed = states.get("completed", 0)
    limit = meter.limit(meter.cores("resume"), waits_on="commit latency / services")
    cpu = meter.where(resume=("resume",), services=("services",))
    took = count * wall / max(completed, 1) if timed_out else wall
    if timed_out:
        value = f"> {wall:.0f} s (stopped at the deadline; ~{took:,.0f} s at this rate)"
    else:
        value = f"{wall:.1f} s ({count / wall:,.0f} orders/s)"
    return Row(
        what=f"`order-saga resume` over {count:,} stuck orders, {kind}",
        value=value,
        reference=f"raw {kind} loop: {count / raw:.1f} s for {count:,} orders" if raw else "",
        ratio=f"{count / raw / took:.0%}" if raw and took else "",
        target="< 10 s" if count >= 10_000 else "< 10 s at 10,000",
        limit=f"{limit}; {cpu}; {outcome(states)}",
    )


def run(cfg: Config, references: dict[str, float]) -> list[Row]:
    count, seconds = cfg.n(10_000, 300), cfg.seconds(75, 30)
    rows = []
    for kind in cfg.databases():
        raw = references.get(kind, 0.0)
        rows += [in_process(cfg, kind, count, raw), sweep(cfg, kind, count, seconds, raw)]
    return rows
