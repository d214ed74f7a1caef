"""`/metrics` of `serve --workers 2`: whichever worker answers a scrape serves the counts of
all of them (prometheus_client's multiprocess mode, in a directory the parent makes and
removes, or the next serve when it was killed outright). Before, each scrape showed the one
worker's own: 11 orders split 3/8 were scraped as 3 or 8, never 11, and Prometheus saw each
change of worker as a reset.

Every request opens a fresh connection, so the kernel spreads them over both workers.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.meter import children
from downstream.seed import ORDINARY_USER_ID, WIDGET_ID
from order_saga.metrics_dir import PREFIX, hold
from tests.support.api import TERMINAL
from tests.support.events import FAST_EVENTS, sink_seen
from tests.support.processes import run_saga
from tests.support.services import HTTP, Downstream
from tests.support.serving import Served, fresh_database
from tests.support.settings import saga_env
from tests.support.waiting import wait_until

ORDERS = 16  # one connection each: all on one worker has p = 2 * 2^-16
SCRAPES = 8


def _samples(text: str, name: str) -> Counter[tuple[str, ...]]:
    """The samples called `name` in one scrape, by their label values."""
    found: Counter[tuple[str, ...]] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sample.labels.values())] += int(sample.value)
    return found


def _place_and_finish(served: Served) -> list[str]:
    body = {"user_id": ORDINARY_USER_ID, "product_id": WIDGET_ID, "quantity": 1}
    placed = [HTTP.post(f"{served.url}/orders", json=body) for _ in range(ORDERS)]
    assert all(r.status_code in (201, 202) for r in placed), [r.text for r in placed]
    ids = [str(r.json()["id"]) for r in placed]
    wait_until(
        lambda: all(HTTP.get(f"{served.url}/orders/{i}").json()["state"] in TERMINAL for i in ids),
        30,
        what="every order to end",
        alive=served.saga.running,
    )
    return ids


def _scrape(served: Served) -> str:
    return HTTP.get(f"{served.url}/metrics").text


def _scrapes(served: Served) -> list[str]:
    return [_scrape(served) for _ in range(SCRAPES)]


@pytest.mark.slow
def test_every_scrape_of_serve_workers_counts_every_worker(tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"  # the parent's TMPDIR: where its metrics directory goes
    scratch.mkdir()
    with fresh_database("sqlite", str(tmp_path)) as url:
        env = saga_env(database_url=url) | {"TMPDIR": str(scratch)}  # embedded services
        served = Served(env, "--workers", "2").wait_ready()
        try:
            ids = _place_and_finish(served)
            logged: Counter[tuple[str, ...]] = Counter()
            for order_id in ids:
                for row in HTTP.get(f"{served.url}/orders/{order_id}/transitions").json():
                    logged[row["scope"], row["trigger"]] += 1
            scrapes = _scrapes(served)
            shared = [p.name for p in scratch.iterdir()]
        finally:
            output = served.stop()
    counted = [_samples(text, "order_saga_transitions_total") for text in scrapes]
    runs = [_samples(text, "order_saga_run_seconds_count")[()] for text in scrapes]
    assert counted == [logged] * SCRAPES, (counted, logged, output)
    assert runs == [runs[0]] * SCRAPES and runs[0] >= ORDERS, (runs, output)
    assert len(shared) == 1 and shared[0].startswith("order-saga-metrics-"), shared
    assert list(scratch.iterdir()) == [], "serve left its metrics directory behind"


@pytest.mark.slow
def test_each_delivery_of_the_workers_relays_is_counted_once(
    tmp_path: Path, downstream: Downstream
) -> None:
    """Each worker's relay child reports its deliveries for the worker to count: the child
    counts them too, but its own counts must stay out of the workers' sum."""
    with fresh_database("sqlite", str(tmp_path)) as url:
        env = saga_env(database_url=url, services_url=downstream.url, **FAST_EVENTS)
        served = Served(env, "--workers", "2").wait_ready()
        try:
            added = run_saga("webhooks", "add", f"{downstream.url}/sink", "--json", env=env)
            assert added.returncode == 0, added.explain()
            secret = json.loads(added.stdout)["secret"]
            HTTP.put(f"{downstream.url}/sink/secret", json={"secret": secret}).raise_for_status()
            _place_and_finish(served)
            wait_until(
                lambda: (
                    sum(_samples(_scrape(served), "order_saga_outbox_pending").values()) == 0
                    and sink_seen(downstream.url)["events"]
                ),
                30,
                what="every event delivered",
                alive=served.saga.running,
            )
            seen = sink_seen(downstream.url)
            scrapes = _scrapes(served)
        finally:
            output = served.stop()
    sent = len(seen["events"]) + seen["duplicates"]
    delivered = [sum(_samples(t, "order_saga_outbox_deliveries_total").values()) for t in scrapes]
    assert delivered == [sent] * SCRAPES, (delivered, seen, output)


def _exited(pid: int) -> bool:
    """No /proc entry, or a zombie nobody has reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.slow
def test_the_metrics_directory_of_a_parent_killed_outright_goes_at_the_next_start(
    tmp_path: Path, downstream: Downstream
) -> None:
    """kill -9 skips the parent's cleanup: its directory stayed in TMPDIR for good, one
    per crash. The next `serve --workers` removes it, but never one a live serve holds
    (here this test holds one) nor one without the lock file (not known to be ours)."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    live, foreign = scratch / f"{PREFIX}live", scratch / f"{PREFIX}foreign"
    live.mkdir()
    foreign.mkdir()
    held = hold(str(live))
    try:
        with fresh_database("sqlite", str(tmp_path)) as url:
            env = saga_env(database_url=url, services_url=downstream.url) | {"TMPDIR": str(scratch)}
            first = Served(env, "--workers", "2").wait_ready()
            workers = wait_until(
                lambda: len(found := children(first.saga.process.pid)) == 2 and found,
                30,
                what="serve's two workers",
            )
            [stale] = set(scratch.iterdir()) - {live, foreign}
            try:
                first.saga.process.kill()
                wait_until(lambda: all(map(_exited, workers)), 30, what="the workers gone")
            finally:
                for pid in workers:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                first.saga.wait()
            assert stale.is_dir()  # left behind by the kill
            second = Served(env, "--workers", "2").wait_ready()
            try:
                left = set(scratch.iterdir())
            finally:
                output = second.stop()
    finally:
        os.close(held)
    assert stale not in left, (left, output)
    assert {live, foreign} < left and len(left) == 3, (left, output)  # + the second's own
    assert set(scratch.iterdir()) == {live, foreign}, output
