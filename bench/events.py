"""Order events (issue 19) under load, on SQLite and PostgreSQL:

1. The engine in-process at 16 orders at once (fake services, as `bench.engine`) with the
   relay off (no destination) and on (a webhook to the reference sink and RabbitMQ, the
   relay as `serve` runs it: a child process of the engine's; and as `order-saga relay`
   started on its own; both at `relay_nice`), alternated off, on, off, on on one
   engine so a machine whose load drifts still gives a fair ratio. After each "on" leg
   the backlog is drained before the relay stops.
2. `POST /orders` over HTTP at the HTTP bench's highest rate (32 clients) against a
   `serve` whose relay delivers to the reference sink and to RabbitMQ: /metrics sampled
   every 0.5 s for each destination's lag (age of its oldest undelivered event) and its
   deliveries counter, so events/s delivered per destination stand beside orders/s.

RabbitMQ is the machine's broker (ORDER_SAGA_BENCH_AMQP_URL, default guest@127.0.0.1); when
it does not answer, the webhook alone is measured and the row says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp
import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench import engine_api
from bench.common import (
    Config,
    Measured,
    Processes,
    Row,
    saga_argv,
    saga_env,
    scratch_database,
    serving,
    start_services,
)
from bench.engine import drive
from bench.fakes import fake_services
from bench.http_load import load
from fsm.migrate import upgrade
from fsm.settings import Settings

AT_ONCE = 16
CLIENTS = 32
AMQP = os.environ.get("ORDER_SAGA_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
DRAIN_SECONDS = 60.0


def broker_answers(url: str = AMQP) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5672), 2):
            return True
    except OSError:
        return False


def set_sink_secret(services_url: str, secret: str) -> None:
    httpx.put(f"{services_url}/sink/secret", json={"secret": secret}).raise_for_status()


# -- 1. the engine, relay off vs on ---------------------------------------------------------


@dataclass
class Legs:
    off: list[Measured] = field(default_factory=list)
    on: list[Measured] = field(default_factory=list)
    drained: list[float] = field(default_factory=list)  # seconds after an "on" leg
    lag_at_end: list[float] = field(default_factory=list)  # worst destination, end of leg

    @staticmethod
    def rate(legs: list[Measured]) -> float:
        wall = sum(m.wall for m in legs)
        return sum(m.count for m in legs) / wall if wall else 0.0

    @staticmethod
    def per_order(legs: list[Measured]) -> str:
        """The engine's CPU per order, and how long its threads waited for a core."""
        n = sum(m.count for m in legs) or 1
        cpu = sum(m.cpu_seconds for m in legs) * 1000 / n
        queued = sum(m.queued_seconds for m in legs) * 1000 / n
        return f"engine {cpu:.2f} ms CPU/order, waited for a core {queued:.2f} ms/order"

    def errors(self) -> int:
        return sum(m.errors for m in self.off + self.on)


@contextlib.asynccontextmanager
async def own_process(url: str, amqp_url: str | None) -> AsyncIterator[None]:
    """`order-saga relay` in a process of its own (SIGTERM at the end)."""
    extra = {"ORDER_SAGA_AMQP_URL": amqp_url} if amqp_url else {}
    relay = subprocess.Popen(
        saga_argv("relay"),
        env=saga_env(url, **extra),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        yield
    finally:
        relay.terminate()
        try:
            relay.wait(timeout=30)
        except subprocess.TimeoutExpired:
            relay.kill()
            relay.wait()


async def engine_legs(
    url: str, sink: str, amqp_url: str | None, count: int, seconds: float, *, apart: bool
) -> Legs:
    legs = Legs()
    async with engine_api.open_engine(url, fake_services()) as engine:
        await drive(engine, max(5, count // 50), 4, seconds)  # warm-up, not counted
        for _ in range(2):
            legs.off.append(await drive(engine, count, AT_ONCE, seconds))
            secret = await engine_api.subscribe_webhook(engine, f"{sink}/sink")
            set_sink_secret(sink, secret)
            running = own_process(url, amqp_url) if apart else None
            async with running or engine_api.relaying(engine, amqp_url):
                want = 2 if amqp_url else 1
                deadline = time.monotonic() + 30
                while len(await engine_api.destinations(engine)) < want:
                    if time.monotonic() > deadline:
                        raise RuntimeError("the relay did not register RabbitMQ in 30 s")
                    await asyncio.sleep(0.05)
                legs.on.append(await drive(engine, count, AT_ONCE, seconds))
                backlog = await engine_api.backlog(engine)
                legs.lag_at_end.append(
                    max((lag for _n, lag, _dead in backlog.values()), default=0.0)
                )
                began = time.monotonic()
                while any(n for n, _lag, _dead in (await engine_api.backlog(engine)).values()):
                    if time.monotonic() - began > DRAIN_SECONDS:
                        raise RuntimeError(f"backlog not drained in {DRAIN_SECONDS:.0f} s")
                    await asyncio.sleep(0.1)
                legs.drained.append(time.monotonic() - began)
            await engine_api.unsubscribe_all(engine)
    return legs


def engine_rows(
    cfg: Config, kind: str, services_url: str, amqp_url: str | None, *, apart: bool
) -> list[Row]:
    # Legs end by time (the count is out of reach): 1,000 orders took ~1.5 s, less than
    # the relay's start-up, and the legs spread widely.
    count, seconds = cfg.n(1_000_000, 100), cfg.seconds(10, 4)
    with scratch_database(cfg, kind, "events-engine") as url:
        upgrade(url)
        legs = asyncio.run(engine_legs(url, services_url, amqp_url, count, seconds, apart=apart))
    off, on = Legs.rate(legs.off), Legs.rate(legs.on)
    where = "a webhook sink + RabbitMQ" if amqp_url else "a webhook sink (RabbitMQ unreachable)"
    errors = f", {legs.errors()} not completed" if legs.errors() else ""
    relay = (
        f"in its own process (`order-saga relay`, nice {Settings().relay_nice})"
        if apart
        else f"as serve runs it (a child process, nice {Settings().relay_nice})"
    )
    return [
        Row(
            what=f"engine on {kind}, {AT_ONCE} orders at once, fake services, relay ON "
            f"delivering to {where}, {relay} (2 legs, "
            f"{' + '.join(f'{m.wall:.1f}' for m in legs.on)} s, "
            f"{sum(m.count for m in legs.on):,} orders{errors}; backlog drained "
            f"{max(legs.drained):.1f} s after a leg, worst lag at its end "
            f"{max(legs.lag_at_end):.2f} s)",
            value=f"{on:,.0f} orders/s; {Legs.per_order(legs.on)}",
            reference=f"relay off (no destination), legs alternated: {off:,.0f} orders/s; "
            f"{Legs.per_order(legs.off)}",
            ratio=f"{on / off:.0%}" if off else "-",
            target="≥ 90% of relay off",
            limit="the 2 cores: the relay's CPU (an HTTP request and a publish per event, "
            "below the engine's priority), the sink's and the broker's; the engine's threads "
            "wait for a core (above) more than its CPU per order grows",
        )
    ]


# -- 2. HTTP at the highest rate, lag per destination ---------------------------------------


@dataclass
class Sample:
    at: float
    delivered: dict[str, float]
    lag: dict[str, float]
    pending: dict[str, float]


def scrape(text: str) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    delivered: dict[str, float] = {}
    lag: dict[str, float] = {}
    pending: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.labels.get("destination")
            if name is None:
                continue
            if sample.name == "order_saga_outbox_deliveries_total":
                delivered[name] = sample.value
            elif sample.name == "order_saga_outbox_lag_seconds":
                lag[name] = sample.value
            elif sample.name == "order_saga_outbox_pending":
                pending[name] = sample.value
    return delivered, lag, pending


async def sampled_load(base: str, seconds: float) -> tuple[int, float, list[Sample], float]:
    """(orders completed, wall, /metrics samples during the load, seconds to drain after)."""
    samples: list[Sample] = []
    stop = asyncio.Event()

    async with aiohttp.ClientSession(base) as session:

        async def sample() -> None:
            while not stop.is_set():
                async with session.get("/metrics") as response:
                    found = scrape(await response.text())
                samples.append(Sample(time.monotonic(), *found))
                await asyncio.sleep(0.5)

        sampler = asyncio.create_task(sample())
        result = await load(base, CLIENTS, seconds)
        stop.set()
        await sampler
        began = time.monotonic()
        while True:
            async with session.get("/metrics") as response:
                _delivered, _lag, pending = scrape(await response.text())
            if pending and not any(pending.values()):
                break
            if time.monotonic() - began > DRAIN_SECONDS:
                break
            await asyncio.sleep(0.1)
        drained = time.monotonic() - began
    return len(result.latencies), result.wall, samples, drained


async def relay_up(base: str, destinations: int, timeout: float = 30.0) -> None:
    """Until /metrics lists `destinations` destinations (the relay registers RabbitMQ)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(base) as session:
        while True:
            async with session.get("/metrics") as response:
                _delivered, _lag, pending = scrape(await response.text())
            if len(pending) >= destinations:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"serve's relay did not register RabbitMQ in {timeout:.0f} s")
            await asyncio.sleep(0.1)


def http_rows(cfg: Config, kind: str, amqp_url: str | None, reference: float) -> list[Row]:
    seconds = cfg.seconds(10, 3)

    def webhook(url: str, services_url: str) -> None:
        upgrade(url)
        added = subprocess.run(
            saga_argv("webhooks", "add", f"{services_url}/sink", "--json"),
            env=saga_env(url),
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        set_sink_secret(services_url, json.loads(added.stdout)["secret"])

    extra = {"ORDER_SAGA_AMQP_URL": amqp_url} if amqp_url else {}
    with serving(cfg, kind, "events-http", prepare=webhook, **extra) as up:
        # serve's relay (a child process) is up once it has registered RabbitMQ, as in 1.
        asyncio.run(relay_up(up.base, 2 if amqp_url else 1))
        asyncio.run(load(up.base, 2, min(2.0, seconds)))  # warm-up: connections, caches
        done, wall, samples, drained = asyncio.run(sampled_load(up.base, seconds))
    per_second = done / wall if wall else 0.0
    rows = []
    for name in sorted(
        {n for s in samples for n in s.delivered} | {n for s in samples for n in s.lag}
    ):
        shown = "RabbitMQ" if name == "amqp" else "webhook sink"
        had = [s for s in samples if name in s.delivered]
        rate = 0.0
        if len(had) >= 2 and had[-1].at > had[0].at:
            rate = (had[-1].delivered[name] - had[0].delivered[name]) / (had[-1].at - had[0].at)
        worst = max((s.lag.get(name, 0.0) for s in samples), default=0.0)
        rows.append(
            Row(
                what=f"`POST /orders` over HTTP, {kind}, {CLIENTS} clients, {seconds:.0f} s, "
                f"events to {shown} ({done:,} orders; {len(samples)} samples of /metrics; "
                f"backlog drained {drained:.1f} s after the load)",
                value=f"{per_second:,.0f} orders/s; {rate:,.0f} events/s delivered; "
                f"max lag {worst:.2f} s",
                reference=f"same load, no destination: {reference:,.0f} orders/s"
                if reference
                else "",
                ratio=f"{per_second / reference:.0%}" if reference else "",
                target="lag < 1 s",
                limit="the relay (serve's child process, lower CPU priority) shares the database",
            )
        )
    if not amqp_url:
        rows.append(Row(what=f"RabbitMQ on {kind}", value="skipped: the broker does not answer"))
    return rows


def run(cfg: Config, references: dict[str, float]) -> list[Row]:
    amqp_url = AMQP if broker_answers() else None
    rows: list[Row] = []
    for kind in cfg.databases():
        with Processes(cfg) as procs:
            _services, services_url = start_services(procs)
            for apart in (False, True):
                rows += engine_rows(cfg, kind, services_url, amqp_url, apart=apart)
        rows += http_rows(cfg, kind, amqp_url, references.get(f"http-{CLIENTS}-{kind}", 0.0))
    return rows
