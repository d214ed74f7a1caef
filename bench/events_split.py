"""Where the relay's cost to the engine goes (issue 19; a diagnostic, not a `make bench`
phase): the engine in-process at 16 orders at once, fake services, on one engine and one
database, legs rotated so a drifting machine load is shared:

  a. relay off, no destination (each event written, nothing reads it);
  c. two destinations subscribed (a webhook sink + RabbitMQ), a relay running as serve
     runs it (child process, nice) whose sends cost nothing (bench.null_relay): its reads
     and its one transaction per batch (the cursor moved, the lease renewed) alone;
  d. the same, the real relay child delivering to the sink and RabbitMQ (bench.events).
(Leg b, destinations subscribed and no relay, measured the delivery rows each event's
commit wrote per destination; since the cursors (migration 0008) the commit writes the
event row alone, whoever is subscribed: b was a again.)

    python -m bench.events_split [--no-pg] [--rounds 2] [--seconds 15] [--count N]
                                 [--sink-nice 0-19]

A leg ends after `--seconds` (or `--count` orders, by default out of reach). The relay
child shares the engine's session, as serve's does; `--sink-nice` lowers the reference
services' autogroup (a stand-in for a consumer on another machine).

Prints one line per leg kind: orders/s (ratio to a); CPU ms per order of the engine, the
relay process, PostgreSQL's processes, the sink (reference services) and RabbitMQ, and
their sum (on a loaded 2-core machine the CPU budget per order is the steadier figure);
how busy the machine was; how long the engine's threads were runnable but waited for a
core, per order (schedstat).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from bench import engine_api
from bench.common import BUYER, DEFAULT_PG, Config, Processes, scratch_database, start_services
from bench.events import AMQP, broker_answers, set_sink_secret
from bench.fakes import fake_services
from bench.meter import _machine, cpu_seconds, queued_seconds
from fsm import outbox, outbox_sql
from fsm.migrate import upgrade
from fsm.relay import AMQP_DESTINATION
from fsm.settings import Settings
from fsm.store import utcnow

AT_ONCE = 16
SINK_PID = [0]
KINDS = ("a", "c", "d")
NAMES = {
    "a": "relay off, no destination",
    "c": "2 destinations, relay child with free sends (read + settle only)",
    "d": "2 destinations, relay child to webhook sink + RabbitMQ (full)",
}


def named_cpu(name: str) -> dict[int, float]:
    """CPU of every process named `name` (postgres backends; RabbitMQ's beam.smp)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/comm"):
        try:
            if stat.read_text().strip() == name:
                found[int(stat.parent.name)] = cpu_seconds(int(stat.parent.name))
        except (OSError, ValueError):
            continue
    return found


def pg_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU of postgres processes during the leg (new backends counted from 0)."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


@dataclass
class Leg:
    orders: int = 0
    wall: float = 0.0
    engine_cpu: float = 0.0
    relay_cpu: float = 0.0
    pg_cpu: float = 0.0
    sink_cpu: float = 0.0  # the reference services' process (the webhook sink)
    broker_cpu: float = 0.0  # RabbitMQ
    busy: float = 0.0  # machine busy cores x seconds
    queued: float = 0.0  # the engine's threads: seconds runnable, waiting for a core
    rates: list[float] = field(default_factory=list)


@contextlib.asynccontextmanager
async def child(module: list[str], settings: Settings) -> AsyncIterator[subprocess.Popen[bytes]]:
    # In the engine's session (its autogroup), as serve's relay child runs.
    proc = subprocess.Popen(module, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    assert proc.stdin is not None
    proc.stdin.write(settings.model_dump_json().encode() + b"\n")
    proc.stdin.flush()
    try:
        yield proc
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def subscribe(engine: engine_api.Engine, sink: str) -> None:
    secret = await engine_api.subscribe_webhook(engine, f"{sink}/sink")
    set_sink_secret(sink, secret)
    store = engine.store
    await store.committer.submit(
        partial(
            outbox_sql.add_destination,
            store.dialect,
            name=AMQP_DESTINATION,
            kind="amqp",
            url=AMQP,
            secret=None,
            events=outbox.subscription(outbox.DEFAULT_TYPES),
            now=utcnow(),
            replace=True,
        )
    )


async def drive(engine: engine_api.Engine, count: int, seconds: float) -> tuple[int, float]:
    deadline = time.monotonic() + seconds
    started = done = 0

    async def lane() -> None:
        nonlocal started, done
        while started < count and time.monotonic() < deadline:
            started += 1
            await engine.order(**BUYER)
            done += 1

    began = time.monotonic()
    await asyncio.gather(*(lane() for _ in range(AT_ONCE)))
    return done, time.monotonic() - began


async def leg(
    engine: engine_api.Engine, kind: str, sink: str, count: int, seconds: float, out: Leg
) -> None:
    sink_pid = SINK_PID[0]
    settings = Settings(database_url=engine.url, amqp_url=AMQP)
    relay: contextlib.AbstractAsyncContextManager[subprocess.Popen[bytes] | None]
    if kind != "a":
        await subscribe(engine, sink)
    if kind == "c":
        relay = child([sys.executable, "-m", "bench.null_relay"], settings)
    elif kind == "d":
        relay = child([sys.executable, "-m", "order_saga.cli", "relay", "--child"], settings)
    else:
        relay = contextlib.nullcontext(None)
    async with relay as proc:
        if proc is not None:
            await asyncio.sleep(3.0)  # started, imports done, first claims made
        relay_cpu0, pg0, own0, m0 = (
            cpu_seconds(proc.pid) if proc else 0.0,
            named_cpu("postgres"),
            cpu_seconds(),
            _machine(),
        )
        sink0, broker0 = cpu_seconds(sink_pid), named_cpu("beam.smp")
        q0 = queued_seconds()
        done, wall = await drive(engine, count, seconds)
        out.queued += queued_seconds() - q0
        m1 = _machine()
        out.orders += done
        out.wall += wall
        out.rates.append(done / wall)
        out.engine_cpu += cpu_seconds() - own0
        out.relay_cpu += (cpu_seconds(proc.pid) - relay_cpu0) if proc else 0.0
        out.pg_cpu += pg_delta(pg0, named_cpu("postgres"))
        out.sink_cpu += cpu_seconds(sink_pid) - sink0
        out.broker_cpu += pg_delta(broker0, named_cpu("beam.smp"))
        ticks = os.sysconf("SC_CLK_TCK")
        out.busy += ((m1[0] - m0[0]) - (m1[1] - m0[1]) - (m1[2] - m0[2])) / ticks
        if proc is not None:  # drained before the relay stops
            began = time.monotonic()
            while any(n for n, _lag, _dead in (await engine_api.backlog(engine)).values()):
                if time.monotonic() - began > 120:
                    raise RuntimeError("backlog not drained in 120 s")
                await asyncio.sleep(0.1)
    if kind != "a":
        await engine_api.unsubscribe_all(engine)


async def run_db(url: str, sink: str, rounds: int, count: int, seconds: float) -> dict[str, Leg]:
    legs = {k: Leg() for k in KINDS}
    async with engine_api.open_engine(url, fake_services()) as engine:
        await drive(engine, max(5, count // 50), seconds)  # warm-up
        for r in range(rounds):
            order = KINDS if r % 2 == 0 else tuple(reversed(KINDS))
            for kind in order:
                await leg(engine, kind, sink, count, seconds, legs[kind])
    return legs


def report(db: str, legs: dict[str, Leg]) -> None:
    base = legs["a"].orders / legs["a"].wall
    print(f"\n### {db} (load {os.getloadavg()[0]:.1f})")
    print(
        "| leg | orders/s | of a | CPU ms/order: engine | relay | postgres | sink | "
        "RabbitMQ | all five | machine busy | engine waiting for a core | legs (orders/s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for kind in KINDS:
        g = legs[kind]
        rate = g.orders / g.wall
        n = g.orders or 1
        total = g.engine_cpu + g.relay_cpu + g.pg_cpu + g.sink_cpu + g.broker_cpu
        print(
            f"| {kind}. {NAMES[kind]} | {rate:,.0f} | {rate / base:.0%} | "
            f"{g.engine_cpu * 1000 / n:.2f} | {g.relay_cpu * 1000 / n:.2f} | "
            f"{g.pg_cpu * 1000 / n:.2f} | {g.sink_cpu * 1000 / n:.2f} | "
            f"{g.broker_cpu * 1000 / n:.2f} | {total * 1000 / n:.2f} | "
            f"{g.busy / g.wall:.2f} cores | {g.queued * 1000 / n:.2f} ms/order | "
            f"{', '.join(f'{x:.0f}' for x in g.rates)} |"
        )
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-pg", action="store_true")
    parser.add_argument("--no-sqlite", action="store_true")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--sink-nice", type=int, default=0, choices=range(20), metavar="0-19")
    args = parser.parse_args()
    if not broker_answers():
        raise SystemExit("RabbitMQ does not answer")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Config(tmp=Path(tmp), pg_server=None if args.no_pg else DEFAULT_PG)
        kinds = [k for k in cfg.databases() if not (args.no_sqlite and k == "sqlite")]
        with Processes(cfg) as procs:
            services, sink = start_services(procs)
            SINK_PID[0] = services.pid
            Path(f"/proc/{services.pid}/autogroup").write_text(str(args.sink_nice))
            for db in kinds:
                with scratch_database(cfg, db, "events-split") as url:
                    upgrade(url)
                    legs = asyncio.run(run_db(url, sink, args.rounds, args.count, args.seconds))
                report(db, legs)
    print(json.dumps({"load": os.getloadavg()}))


if __name__ == "__main__":
    main()
