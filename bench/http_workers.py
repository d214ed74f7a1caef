"""`serve --workers 2` against one `serve` process over HTTP on PostgreSQL (issue 20): 32
clients, services in another process, each run a fresh database, services and serve
(`--no-sweep`), the two alternating (1 2 1 2 ...). The figure that must not grow is serve's
CPU per completed order, the parent's and both forked workers' user + sys from /proc.

On 2 cores shared with the services, PostgreSQL and the load generator, orders/s is
bounded by the machine more than by one `serve`; the CPU per order says whether a second
process costs anything per order (it must be within 10 % of one process). Beside it, the
transactions PostgreSQL committed per order (pg_stat_database): group commit shares one
commit among the orders one process has in flight, and two processes each batch fewer.
"""

from __future__ import annotations

import statistics

from bench.common import Config, Row
from bench.http_load import Run, median_run, serve_once, shown


def run(cfg: Config) -> list[Row]:
    if "postgresql" not in cfg.databases():
        return [Row("`serve --workers 2` over HTTP (PostgreSQL)", f"skipped: {cfg.pg_skip_reason}")]
    seconds, reps = cfg.seconds(10, 3), 1 if cfg.quick else 2
    ones: list[Run] = []
    twos: list[Run] = []
    for _ in range(reps):
        ones.append(serve_once(cfg, "postgresql", seconds))
        twos.append(serve_once(cfg, "postgresql", seconds, serve_args=("--workers", "2")))
    rate1, _, _, cpu1 = median_run(ones)
    rate2, _, _, cpu2 = median_run(twos)
    errors = sum(sum(r.load.failures.values()) for r in ones + twos)
    last = twos[-1].meter
    return [
        Row(
            what=f"`serve --workers 2 --no-sweep`, postgresql, 32 clients, {reps}× {seconds:.0f} s"
            f" alternating with one process ({errors} errors)",
            value=shown(twos),
            reference=f"one process: {shown(ones)}",
            ratio=f"CPU/order {cpu2 / cpu1:.2f}×; orders/s {rate2 / rate1:.2f}×; PostgreSQL "
            f"commits/order {statistics.median(r.commits for r in ones):.2f} → "
            f"{statistics.median(r.commits for r in twos):.2f}"
            if cpu1 > 0 and rate1 > 0
            else "-",
            target="CPU/order within 10% of one process (≤ 1.10×)",
            limit=last.limit(last.cores("server"), waits_on="commit latency / services", cap=2.0)
            + "; "
            + last.where(serve=("server",), services=("services",), generator=()),
        )
    ]
