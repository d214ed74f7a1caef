"""`POST /orders` over HTTP with a `client` key against the same load with no
authentication (issue 17: within 10 %), and the gate's own cost per request.

Both arms run against one `serve --no-sweep` process (its own database and reference
services, warmed up with open traffic first), 32 clients, in legs of equal length in ABBA
order (open keyed keyed open keyed open open keyed): the process, the database's growth
and the machine's drift over the run weigh on both arms alike, and no leg pays for a
process start. A keyed leg sends a `client` key made for it; before it, the bench waits
until serve refuses a caller without a key (authentication on). An open leg follows the
deletion of every key row (this bench's scratch database only), once serve lets a caller
without a key through again. The gate hashes the secret (HMAC-SHA256 with the
deployment's pepper) and finds it in its per-process cache, which reads the database once
per ORDER_SAGA_KEY_CACHE_SECONDS per key, the requests that find it expired sharing that
read (the same bound holds revocation).

The figure is the median over the consecutive pairs of legs (one of each arm) of keyed ÷
open: serve's CPU per completed order first (user + sys from /proc, steady whatever the
machine's load), then orders/s (which the load moves); the pairs' range beside it.

The gate row times `AuthGate` in this process in front of an app that does nothing: a
cached key, no authentication at all, and a miss every time (what each process pays once
per key per KEY_CACHE_SECONDS), against serve's CPU per order measured above.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
import uuid
from typing import Any

import httpx
from sqlalchemy import delete

from bench.common import Config, Row, Served, abba, serving
from bench.http_load import Run, drive_server, load, median_run, shown

CLIENTS = 32
KEY_NAME = "bench-client"


def _make_key(database_url: str, name: str = KEY_NAME) -> str:
    from fsm import keys
    from fsm.engine import make_engine
    from fsm.roles import Role

    engine = make_engine(database_url)
    try:
        return keys.create_key(engine=engine, name=name, role=Role.CLIENT)
    finally:
        engine.dispose()


def _drop_keys(database_url: str) -> None:
    from fsm import keys
    from fsm.engine import make_engine

    engine = make_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(delete(keys.keys))
    finally:
        engine.dispose()


def _wait_gate(base: str, *, enforced: bool, timeout: float = 15.0) -> None:
    """Until serve refuses a caller without a key (401), or lets it through (a 404 for an
    order that does not exist), as its 'any keys?' cache catches up."""
    want = 401 if enforced else 404
    path = f"{base}/orders/{uuid.uuid4()}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(path, timeout=5.0).status_code == want:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{base}: no {want} {timeout:.0f}s after the keys changed")


def _switch(up: Served, *, keyed: bool, leg: int) -> dict[str, str] | None:
    """Turn authentication on (a new `client` key, returned as headers) or off."""
    if not keyed:
        _drop_keys(up.url)
        _wait_gate(up.base, enforced=False)
        return None
    headers = {"Authorization": f"Bearer {_make_key(up.url, f'{KEY_NAME}-{leg}')}"}
    _wait_gate(up.base, enforced=True)
    return headers


def measure(cfg: Config, kind: str, seconds: float, legs: int) -> list[tuple[Run, Run]]:
    """(open, keyed) per consecutive pair of legs, ABBA order, one serve process."""
    done: list[Run] = []
    with serving(cfg, kind, "auth") as up:
        asyncio.run(load(up.base, 2, min(3.0, seconds)))  # warm-up, open
        headers, keyed = None, False
        for leg, arm in enumerate(abba(legs)):
            if bool(arm) != keyed:
                keyed = bool(arm)
                headers = _switch(up, keyed=keyed, leg=leg)
            pids = {"services": up.services.pid}
            done.append(drive_server(up.serve, up.base, CLIENTS, seconds, headers=headers, **pids))
    arms = abba(legs)
    pairs = []
    for i in range(0, legs - 1, 2):
        a, b = (done[i], done[i + 1]) if arms[i] == 0 else (done[i + 1], done[i])
        pairs.append((a, b))
    return pairs


def _spread(values: list[float]) -> str:
    """'1.02× (0.97–1.06)': the median and the range."""
    return f"{statistics.median(values):.2f}× ({min(values):.2f}–{max(values):.2f})"


# -- the gate alone, in this process ------------------------------------------------------


async def _nothing(scope: Any, receive: Any, send: Any) -> None:
    return None


def _gate_us(engine: Any, secret: str | None, *, ttl: float, n: int) -> float:
    """CPU µs per request through AuthGate (the app behind it does nothing)."""
    from api.auth import Authenticator, AuthGate

    gate = AuthGate(_nothing, authenticator=Authenticator(engine, api_token=None, ttl=ttl))
    headers = [(b"content-type", b"application/json")]
    if secret:
        headers.append((b"authorization", f"Bearer {secret}".encode()))
    scope = {"type": "http", "method": "POST", "path": "/orders", "headers": headers}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        if message.get("type") == "http.response.start":
            raise RuntimeError(f"the gate answered {message['status']}")

    async def many() -> float:
        for _ in range(50):  # warm: secrets read, lookups cached
            await gate(dict(scope), receive, send)
        began = time.process_time()
        for _ in range(n):
            await gate(dict(scope), receive, send)
        return (time.process_time() - began) * 1e6 / n

    return asyncio.run(many())


def gate_costs(cfg: Config) -> tuple[float, float, float]:
    """(open, cached key, key missed every time), µs of CPU per request, on SQLite."""
    from sqlmodel import SQLModel

    import fsm.models  # noqa: F401  (registers the tables)
    from fsm import keys
    from fsm.engine import make_engine
    from fsm.roles import Role

    n = cfg.n(20_000, 3_000)
    costs = []
    for name in ("open", "keyed"):
        engine = make_engine(f"sqlite:///{cfg.tmp}/gate-{name}.db")
        try:
            SQLModel.metadata.create_all(engine)
            if name == "open":
                costs.append(_gate_us(engine, None, ttl=2.0, n=n))
                continue
            secret = keys.create_key(engine=engine, name=KEY_NAME, role=Role.CLIENT)
            costs.append(_gate_us(engine, secret, ttl=2.0, n=n))
            costs.append(_gate_us(engine, secret, ttl=1e-9, n=max(n // 20, 200)))
        finally:
            engine.dispose()
    return costs[0], costs[1], costs[2]


def run(cfg: Config) -> list[Row]:
    seconds, legs = cfg.seconds(10, 3), 4 if cfg.quick else 8
    rows = []
    keyed_cpu: list[float] = []
    for kind in cfg.databases():
        load_before = os.getloadavg()[0]
        pairs = measure(cfg, kind, seconds, legs)
        load_after = os.getloadavg()[0]
        opens = [o for o, _ in pairs]
        keyeds = [k for _, k in pairs]
        cpu = [k.cpu_ms / o.cpu_ms for o, k in pairs if o.cpu_ms > 0]
        rate = [k.load.per_second / o.load.per_second for o, k in pairs if o.load.per_second]
        keyed_cpu.append(median_run(keyeds)[3])
        errors = sum(sum(r.load.failures.values()) for r in opens + keyeds)
        last = keyeds[-1].meter
        rows.append(
            Row(
                what=f"`POST /orders` over HTTP with a `client` key, {kind}, {CLIENTS} clients, "
                f"one serve, {legs} legs of {seconds:.0f} s in ABBA order with no "
                f"authentication ({errors} errors)",
                value=shown(keyeds),
                reference=f"no authentication: {shown(opens)}",
                ratio=f"CPU/order {_spread(cpu)}; orders/s {_spread(rate)} "
                f"(median of {len(pairs)} pairs, range)"
                if cpu and rate
                else "-",
                target="within 10% of no authentication (CPU/order ≤ 1.10×, orders/s ≥ 0.90×)",
                limit=last.limit(last.cores("server"), waits_on="commit latency / services")
                + "; "
                + last.where(serve=("server",), services=("services",), generator=())
                + f"; load average {load_before:.1f} → {load_after:.1f}",
            )
        )
    open_us, hit_us, miss_us = gate_costs(cfg)
    serve_ms = min(keyed_cpu) if keyed_cpu else float("nan")
    added_ms = (hit_us - open_us) / 1000
    rows.append(
        Row(
            what="the gate (`AuthGate`) per request, in-process, nothing behind it: "
            "a `client` key found in the cache",
            value=f"{hit_us:.1f} µs CPU (a miss, once per KEY_CACHE_SECONDS per key and "
            f"process: {miss_us:.0f} µs, SQLite)",
            reference=f"no authentication: {open_us:.1f} µs; serve's CPU per order with the "
            f"key above: {serve_ms:.2f} ms",
            ratio=f"+{added_ms * 1000:.0f} µs = {added_ms / serve_ms:.1%} of serve's CPU/order",
            target="a small part of the 10% budget",
            limit="a hit: HMAC-SHA256 of the secret + a dict lookup; a miss: a thread hop "
            "and one read + one `last_used_at` write",
        )
    )
    return rows
