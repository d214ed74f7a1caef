"""PostgreSQL: 1 and then 4 `order-saga worker` processes draining a backlog of pending
orders, the reference services in another process (`order-saga services`).

Per run: a fresh database made by `order-saga db upgrade`, the backlog bulk-inserted as
pending, unleased rows moved an hour ago, fresh services, then the workers started with
`--older-than 0 --interval 0.05`; the clock runs from their start until no order is left
unfinished (polled in the database) or the deadline. Workers are stopped afterwards and
every order must have ended completed.
"""

from __future__ import annotations

import time

from bench.common import (
    Config,
    Measured,
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
from bench.meter import CPUS, Meter
from fsm.machine import is_terminal


def drain(cfg: Config, workers: int, count: int, seconds: float) -> tuple[Measured, str]:
    """Orders/s of `workers` workers over `count` orders; and where the CPU went."""
    with Processes(cfg) as procs, scratch_database(cfg, "postgresql", f"w{workers}") as url:
        migrate(procs, url)
        insert_waiting_orders(url, count)
        services, services_url = start_services(procs)
        counter = StateCounter(url)
        try:
            argv = saga_argv("worker", "--older-than", "0", "--interval", "0.05")
            env = saga_env(url, services_url)
            deadline = time.monotonic() + seconds
            pool = [procs.start(f"worker{i}", argv, env) for i in range(workers)]
            meter = Meter(
                services=services.pid, **{f"worker{i}": p.pid for i, p in enumerate(pool)}
            )
            while (left := counter.unfinished()) > 0 and time.monotonic() < deadline:
                dead = [p for p in pool if p.poll() is not None]
                if dead:
                    raise RuntimeError(f"a worker exited early: {procs.log_tail(dead[0])}")
                time.sleep(0.25)
            meter.stop()
            for proc in pool:
                procs.stop(proc)
            states = counter.counts()
        finally:
            counter.close()
    failed = sum(n for s, n in states.items() if s != "completed" and is_terminal(s))
    m = Measured(count - left, meter.wall, count, errors=failed)
    limit = meter.limit(
        meter.cores("worker"), waits_on="commit latency / services", cap=min(workers, CPUS)
    )
    cpu = meter.where(workers=("worker",), services=("services",))
    return m, f"{limit}; {cpu}; {outcome(states)}"


def run(cfg: Config) -> list[Row]:
    if "postgresql" not in cfg.databases():
        return [Row("workers draining a backlog (PostgreSQL)", f"skipped: {cfg.pg_skip_reason}")]
    count, seconds = cfg.n(10_000, 400), cfg.seconds(90, 30)
    one, one_notes = drain(cfg, 1, count, seconds)
    four, four_notes = drain(cfg, 4, count, seconds)
    return [
        Row(
            what=f"1 `order-saga worker` draining {count:,} pending orders, PostgreSQL, "
            f"services in another process{one.note()}",
            value=f"{one.per_second:,.0f} orders/s",
            limit=one_notes,
        ),
        Row(
            what=f"4 workers draining {count:,} pending orders{four.note()}",
            value=f"{four.per_second:,.0f} orders/s",
            reference=f"1 worker {one.per_second:,.0f} orders/s",
            ratio=f"{four.per_second / one.per_second:.2f}×" if one.per_second else "-",
            target="≥ 1.6×",
            limit=four_notes,
        ),
    ]
