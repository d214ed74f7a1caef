"""`POST /orders` over HTTP with a `client` key against the same load with no
authentication (issue 17: within 10 %), and the gate's own cost per request.

Each run is a fresh database, fresh reference services and a fresh `serve --no-sweep`,
32 clients; keyed and open runs alternate (open keyed open keyed ...) so the machine's
load drifts over both alike. The keyed run makes its key once serve has migrated, waits
until serve refuses a request without it (authentication on), then sends it on every
request: the gate hashes the secret (HMAC-SHA256 with the deployment's pepper) and finds
it in its per-process cache, going to the database only on a miss (once per
ORDER_SAGA_KEY_CACHE_SECONDS per key, which also bounds revocation).

The gate row times `AuthGate` in this process in front of an app that does nothing: a
cached key, no authentication at all, and a miss every time (what each process pays once
per key per KEY_CACHE_SECONDS), against serve's CPU per order measured above.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from bench.common import (
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
from bench.http_load import Run, drive_server, load, median_run, shown

CLIENTS = 32
KEY_NAME = "bench-client"


def _make_key(database_url: str) -> str:
    from fsm import keys
    from fsm.engine import make_engine
    from fsm.keys import Role

    engine = make_engine(database_url)
    try:
        return keys.create_key(engine=engine, name=KEY_NAME, role=Role.CLIENT)
    finally:
        engine.dispose()


def _wait_enforced(base: str, timeout: float = 15.0) -> None:
    """Until serve refuses a caller without a key (its 'any keys?' cache has expired)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(f"{base}/orders", timeout=5.0).status_code == 401:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{base}: still open {timeout:.0f}s after a key was made")


def serve_once(cfg: Config, kind: str, seconds: float, *, keyed: bool) -> Run:
    with Processes(cfg) as procs, scratch_database(cfg, kind, "auth") as url:
        services, services_url = start_services(procs)
        port = free_port()
        argv = saga_argv("serve", "--port", str(port), "--no-sweep")
        serve = procs.start("serve", argv, saga_env(url, services_url))
        base = f"http://127.0.0.1:{port}"
        wait_http(procs, serve, f"{base}/healthz")
        headers = None
        if keyed:
            headers = {"Authorization": f"Bearer {_make_key(url)}"}
            _wait_enforced(base)
        asyncio.run(load(base, 2, min(2.0, seconds), headers=headers))  # warm-up
        return drive_server(serve, base, CLIENTS, seconds, headers=headers, services=services.pid)


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
    from fsm.keys import Role

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
    seconds, reps = cfg.seconds(10, 3), 1 if cfg.quick else 3  # 3: a median of three
    rows = []
    keyed_cpu: list[float] = []
    for kind in cfg.databases():
        opens: list[Run] = []
        keyeds: list[Run] = []
        for _ in range(reps):
            opens.append(serve_once(cfg, kind, seconds, keyed=False))
            keyeds.append(serve_once(cfg, kind, seconds, keyed=True))
        rate0, _, _, cpu0 = median_run(opens)
        rate1, _, _, cpu1 = median_run(keyeds)
        keyed_cpu.append(cpu1)
        errors = sum(sum(r.load.failures.values()) for r in opens + keyeds)
        last = keyeds[-1].meter
        rows.append(
            Row(
                what=f"`POST /orders` over HTTP with a `client` key, {kind}, {CLIENTS} clients, "
                f"{reps}× {seconds:.0f} s alternating with no authentication ({errors} errors)",
                value=shown(keyeds),
                reference=f"no authentication: {shown(opens)}",
                ratio=f"orders/s {rate1 / rate0:.2f}×; CPU/order {cpu1 / cpu0:.2f}×"
                if rate0 > 0 and cpu0 > 0
                else "-",
                target="within 10% of no authentication (orders/s ≥ 0.90×, CPU/order ≤ 1.10×)",
                limit=last.limit(last.cores("server"), waits_on="commit latency / services")
                + "; "
                + last.where(serve=("server",), services=("services",), generator=()),
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
