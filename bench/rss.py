"""The process's resident memory after 10,000 and after 100,000 orders driven in-process
(SQLite, the fake services, 16 at once), measured in a fresh child process
(`python -m bench.rss --child ...`) so nothing of the other benchmarks is counted; a first
checkpoint at 1,000 orders is the warmed-up baseline. If the deadline comes first, the
last row is the RSS at the count reached.

The fakes keep a bounded window of per-order records (full after ~3,300 orders), so their
memory is flat from there on and growth between 10,000 and 100,000 is the engine's.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.common import Config, Row

ROOT = Path(__file__).resolve().parent.parent


def rss_bytes() -> int:
    """Current resident set size, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def child(url: str, checkpoints: list[int], seconds: float) -> list[dict[str, int]]:
    from bench import engine_api
    from bench.common import BUYER
    from bench.engine import drive
    from bench.fakes import fake_services
    from fsm.migrate import upgrade

    upgrade(url)
    deadline = time.monotonic() + seconds
    seen: list[dict[str, int]] = []
    async with engine_api.open_engine(url, fake_services()) as engine:
        await engine.order(**BUYER)
        driven = 0
        for checkpoint in checkpoints:
            left = deadline - time.monotonic()
            if left > 0:
                driven += (await drive(engine, checkpoint - driven, 16, left)).count
            gc.collect()
            seen.append({"planned": checkpoint, "orders": driven, "rss": rss_bytes()})
            if driven < checkpoint:
                break  # the deadline came first
    return seen


def measure(cfg: Config, checkpoints: list[int], seconds: float) -> list[dict[str, int]]:
    argv = [sys.executable, "-m", "bench.rss", "--child", f"sqlite:///{cfg.tmp}/rss.db"]
    argv += ["--seconds", str(seconds), *map(str, checkpoints)]
    # subprocess.run kills the child if the timeout passes or this process is interrupted.
    done = subprocess.run(
        argv, cwd=ROOT, capture_output=True, text=True, timeout=seconds + 120, check=False
    )
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"rss child exited {done.returncode}: {tail}")
    result: list[dict[str, int]] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def run(cfg: Config) -> list[Row]:
    checkpoints = [cfg.n(1_000, 200), cfg.n(10_000, 500), cfg.n(100_000, 2_000)]
    seen = measure(cfg, checkpoints, cfg.seconds(180, 30))
    rows = []
    for before, point in zip(seen, seen[1:], strict=False):
        partial = point["orders"] < point["planned"]
        note = f" (deadline: {point['orders']:,} of {point['planned']:,})" if partial else ""
        target = "within 10% of the row above" if point["planned"] == checkpoints[-1] else ""
        rows.append(
            Row(
                what=f"process RSS after {point['orders']:,} orders in-process{note}",
                value=f"{point['rss'] / 2**20:,.1f} MiB",
                reference=f"after {before['orders']:,}: {before['rss'] / 2**20:,.1f} MiB",
                ratio=f"{point['rss'] / before['rss'] - 1:+.1%}",
                target=target,
                limit="memory: orders in flight (16) + fixed cost; the fakes' memory is bounded",
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="RSS child: drive orders, print RSS as JSON")
    parser.add_argument("--child", metavar="URL", required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("checkpoints", type=int, nargs="+")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(child(args.child, args.checkpoints, args.seconds))))


if __name__ == "__main__":
    main()
