"""The cyclic garbage collector of a long-running process: `serve`, `worker`, `services`,
`relay` (and the relay child of `serve` and `worker`).

CPython collects its youngest generation every 700 net allocations of container objects and,
every hundred or so of those, all of them: every object of the process, most of which are
the modules and tables loaded at start (SQLAlchemy, pydantic, FastAPI, the app) and never
die. Under 32 clients that was about a quarter of `serve`'s event-loop CPU (py-spy --native:
`gc_collect_main`; BENCHMARKS.md, "serve's CPU per order ... the garbage collector").
`settle()`, called once when the process has started: what exists then is frozen (never
scanned again, `gc.freeze`), and the youngest generation is collected every `YOUNG`
allocations, so the objects of the orders in flight mostly die before a collection and are
not promoted to be scanned again and again. Garbage cycles are still collected.

For processes, not libraries: tests and the engine's Python API keep Python's defaults.
"""

from __future__ import annotations

import gc

YOUNG = 10_000  # Python's default: 700


def settle() -> None:
    """Freeze what the process holds now and collect the young generation less often."""
    gc.collect()  # garbage of the start-up is freed, not frozen
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG, middle, old)
