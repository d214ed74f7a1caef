"""A/B of `serve`'s CPU per order over HTTP between code trees, interleaved in one run.

    python -m bench.ab_http --tree before=/tmp/ab/before --tree after=. --reps 3 --seconds 10
    python -m bench.ab_http --tree one=. --tree two=.::--workers=2   # serve arguments per tree

Each tree is a checkout of the project (e.g. `git archive COMMIT | tar -x -C DIR`); its
`serve` runs with PYTHONPATH=DIR, so the installed packages are shared and only the
project's code differs. One `order-saga services` process serves every round. The trees run
round-robin (A B A B ...), each rep a fresh database and a fresh `serve --no-sweep`, a
warm-up, then `clients` closed-loop clients for `seconds`. The figure is serve's user+sys
CPU (from /proc, its forked workers' included) divided by the orders it completed: much
steadier than orders/s on a loaded machine; beside it, the reference services' CPU per
order (with `--own-services`, each tree calls its own `order-saga services`, run from that
tree, so a change to downstream/ is measured too). Does not touch the engine's Python API.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

from bench.common import (
    Config,
    Processes,
    free_port,
    saga_argv,
    saga_env,
    scratch_database,
    start_services,
    wait_http,
)
from bench.http_load import load
from bench.meter import Meter, children


def one(
    cfg: Config,
    procs: Processes,
    tree: Path,
    services_url: str,
    kind: str,
    clients: int,
    seconds: float,
    extra: list[str],
    services_pid: int,
) -> tuple[float, float, float, int, float]:
    """(serve CPU ms per order, orders/s, p99 ms, orders, services CPU ms per order) of one
    rep."""
    with scratch_database(cfg, kind, "ab") as url:
        port = free_port()
        env = saga_env(url, services_url, PYTHONPATH=str(tree.resolve()))
        serve = procs.start(
            "serve", saga_argv("serve", "--port", str(port), "--no-sweep", *extra), env
        )
        base = f"http://127.0.0.1:{port}"
        try:
            wait_http(procs, serve, f"{base}/healthz")
            asyncio.run(load(base, 2, 1.5))
            pids = [serve.pid, *children(serve.pid)]
            meter = Meter(**{f"serve{i}": pid for i, pid in enumerate(pids)})
            services = Meter(services=services_pid)
            result = asyncio.run(load(base, clients, seconds))
            meter.stop()
            services.stop()
        finally:
            procs.stop(serve)
    done = len(result.latencies)
    if result.failures:
        print(f"  failures: {dict(result.failures)}", file=sys.stderr)
    cpu = sum(meter.used.values()) * 1000 / done if done else float("nan")
    p99 = float(result.percentile(99).replace(",", "")) if done > 1 else float("nan")
    downstream = services.used["services"] * 1000 / done if done else float("nan")
    return cpu, done / result.wall, p99, done, downstream


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", required=True, help="NAME=DIR")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--db", default="sqlite", choices=["sqlite", "postgresql"])
    parser.add_argument("--serve-arg", action="append", default=[], help="extra serve args")
    parser.add_argument(
        "--own-services", action="store_true", help="one `order-saga services` per tree"
    )
    args = parser.parse_args()
    trees = [
        (n, Path(d.split("::")[0]), d.split("::")[1:])
        for n, d in (t.split("=", 1) for t in args.tree)
    ]
    results: dict[str, list[tuple[float, float, float, int, float]]] = {n: [] for n, _, _ in trees}
    with tempfile.TemporaryDirectory(prefix="order-saga-ab-") as tmp:
        cfg = Config(tmp=Path(tmp))
        with Processes(cfg) as procs:
            shared = start_services(procs)
            own = {
                name: start_services(procs, tree) if args.own_services else shared
                for name, tree, _ in trees
            }
            for rep in range(args.reps):
                for name, tree, more in trees:
                    extra = [*args.serve_arg, *(a for arg in more for a in arg.split("="))]
                    svc, url = own[name]
                    r = one(
                        cfg, procs, tree, url, args.db, args.clients, args.seconds, extra,
                        svc.pid,
                    )  # fmt: skip
                    results[name].append(r)
                    print(
                        f"rep {rep} {name}: {r[0]:.2f} ms CPU/order, {r[1]:.0f} orders/s, "
                        f"p99 {r[2]:.0f} ms ({r[3]} orders), services {r[4]:.2f} ms/order",
                        file=sys.stderr,
                    )
    first = statistics.median(r[0] for r in results[trees[0][0]])
    base = statistics.median(r[4] for r in results[trees[0][0]])
    print(
        f"| tree | serve CPU ms/order (median; reps) | vs {trees[0][0]} "
        f"| services CPU ms/order (median; reps) | vs {trees[0][0]} | orders/s | p99 ms |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, _, _ in trees:
        rs = results[name]
        cpu = statistics.median(r[0] for r in rs)
        reps = ", ".join(f"{r[0]:.2f}" for r in rs)
        rate = statistics.median(r[1] for r in rs)
        p99 = statistics.median(r[2] for r in rs)
        down = statistics.median(r[4] for r in rs)
        downs = ", ".join(f"{r[4]:.2f}" for r in rs)
        print(
            f"| {name} | {cpu:.2f} ({reps}) | {cpu / first:.2f}× | {down:.2f} ({downs}) "
            f"| {down / base:.2f}× | {rate:.0f} | {p99:.0f} |"
        )


if __name__ == "__main__":
    main()
