"""Where `serve`'s CPU per order goes over HTTP: each thread's CPU (from /proc) and its
event loop's py-spy samples sorted into the layers of a `POST /orders`.

    .venv/bin/pip install py-spy      # not a dependency of the project
    python -m bench.serve_profile --seconds 20 [--clients 32] [--db postgresql] [--keep FILE]

A fresh database, `order-saga services` in another process and `serve --no-sweep`
(`bench.common.serving`), a warm-up, then two legs of `clients` closed-loop clients
(`bench.http_load`): the first reads each thread's CPU from /proc, the second is recorded
by py-spy `--gil --threads` (samples of the thread holding the GIL: idle waits left out).
Two legs, because py-spy stops every thread at each sample, which inflates their system
time. A sample counts for the innermost frame whose file names a layer (`LAYERS`, first
match): library helpers (json, uuid, enum, ...) count for their caller's layer. Prints
markdown.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from bench.common import Config, serving
from bench.http_load import load

_TICKS = os.sysconf("SC_CLK_TCK")

# (a substring of a frame's file, its layer); the first that matches a frame wins.
LAYERS = [
    ("logging/", "logging"),
    ("order_saga/logs.py", "logging"),
    ("aiohttp/", "outgoing calls (aiohttp, fsm.clients)"),
    ("fsm/clients.py", "outgoing calls (aiohttp, fsm.clients)"),
    ("pydantic", "pydantic"),
    ("uvicorn/", "incoming: uvicorn + httptools"),
    ("order_saga/server.py", "incoming: uvicorn + httptools"),
    ("starlette/", "incoming: Starlette/FastAPI + middlewares"),
    ("fastapi/", "incoming: Starlette/FastAPI + middlewares"),
    ("asgi_correlation_id/", "incoming: Starlette/FastAPI + middlewares"),
    ("api/auth.py", "incoming: Starlette/FastAPI + middlewares"),
    ("api/guard.py", "incoming: Starlette/FastAPI + middlewares"),
    ("api/direct.py", "incoming: Starlette/FastAPI + middlewares"),
    ("api/", "incoming: the handler (api.orders)"),
    ("fsm/committer.py", "engine: hand-off to the writer thread"),
    ("fsm/", "engine (fsm)"),
    ("prometheus_client/", "engine (fsm)"),
    ("sqlalchemy/", "engine (fsm)"),
    ("asyncio/", "asyncio + uvloop"),
    ("runpy", "asyncio + uvloop"),  # the loop's own C code: no Python frame below run()
]
_FILE = re.compile(r"\(([^()]*?)(?::\d+)?\)$")
_THREAD = re.compile(r"^thread \((?:0x[0-9a-f]+|(\d+))\): (.*)$")


def layer(frames: list[str]) -> str:
    for frame in reversed(frames):
        match = _FILE.search(frame)
        path = match.group(1) if match else frame
        for pattern, name in LAYERS:
            if pattern in path:
                return name
    return "other"


def threads_cpu(pid: int) -> dict[int, tuple[float, float]]:
    """{thread id: (user, system) CPU seconds} of a process's live threads."""
    found = {}
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found[int(stat.parent.name)] = (int(fields[11]) / _TICKS, int(fields[12]) / _TICKS)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--db", default="sqlite", choices=["sqlite", "postgresql"])
    parser.add_argument("--keep", type=Path, help="keep py-spy's raw samples in this file")
    args = parser.parse_args()
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.exists():
        sys.exit(f"no {spy}: install it with `{spy.parent / 'pip'} install py-spy`")
    with tempfile.TemporaryDirectory(prefix="order-saga-profile-") as tmp:
        raw = args.keep or Path(tmp) / "samples.txt"
        with serving(Config(tmp=Path(tmp)), args.db, "profile") as served:
            asyncio.run(load(served.base, 2, 1.5))
            pid = served.serve.pid
            before = threads_cpu(pid)
            result = asyncio.run(load(served.base, args.clients, args.seconds))
            after = threads_cpu(pid)
            argv = [str(spy), "record", "-p", str(pid), "-d", str(args.seconds), "-r", "100"]
            recording = subprocess.Popen(
                [*argv, "--gil", "--threads", "-f", "raw", "-o", str(raw)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            asyncio.run(load(served.base, args.clients, args.seconds))
            recording.wait()
        orders = len(result.latencies)
        if not orders:
            sys.exit(f"no order completed: {dict(result.failures)}")
        names: dict[int, str] = {}
        samples: dict[str, Counter[str]] = {}
        for line in raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            head, *frames = stack.split(";")
            match = _THREAD.match(head)
            name = match.group(2) if match else head
            if match and match.group(1):
                names[int(match.group(1))] = name
            samples.setdefault(name, Counter())[layer(frames)] += int(count)
    print(f"{orders} orders in {result.wall:.1f} s, {args.clients} clients, {args.db}")
    print("\n| thread | user ms/order | system ms/order |\n|---|---|---|")
    total = 0.0
    for tid, (user, system) in sorted(after.items()):
        u, s = user - before.get(tid, (0, 0))[0], system - before.get(tid, (0, 0))[1]
        total += u + s
        if u + s > 0:
            label = "loop" if tid == pid else names.get(tid, str(tid))
            print(f"| {label} | {u * 1000 / orders:.3f} | {s * 1000 / orders:.3f} |")
    print(f"| all | {total * 1000 / orders:.3f} | |")
    for name, layers in samples.items():
        held = sum(layers.values())
        print(f"\n{name}: {held} samples holding the GIL\n\n| layer | share |\n|---|---|")
        for what, count in layers.most_common():
            print(f"| {what} | {100 * count / held:.1f} % |")


if __name__ == "__main__":
    main()
