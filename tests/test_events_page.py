"""The console's order-events page (issue 19, item 5): a reader sees the destinations, their
backlog and the dead letters but no Redeliver button and may not redeliver; an operator
redelivers with the session's CSRF token (without it: 403), and the relay inside `serve`
then delivers; a webhook's full URL is an admin's to see. Real app (TestClient, lifespan
and relay included), real sink over HTTP, both databases. The same page in a real browser:
tests/test_browser.py."""

from __future__ import annotations

import re
import uuid

import pytest
from fastapi.testclient import TestClient

from fsm import keys, metrics, outbox, subscriptions
from fsm.roles import Role
from fsm.store import Store
from tests.support.api import api, console_sign_in, place
from tests.support.events import FAST_EVENTS, label, sink_seen, subscribe_sink
from tests.support.services import Downstream
from tests.support.waiting import wait_until

CSRF = re.compile(r'name="csrf" value="([^"]+)"')
REDELIVER_BUTTON = '<button type="submit" class="button">Redeliver</button>'


@pytest.fixture
def team(store: Store) -> dict[str, str]:
    made = {
        "shop": Role.CLIENT,
        "auditor": Role.READER,
        "ops-alice": Role.OPERATOR,
        "boss": Role.ADMIN,
    }
    return {n: keys.create_key(engine=store.engine, name=n, role=r) for n, r in made.items()}


def sign_in(client: TestClient, secret: str) -> str:
    """Sign in and return the session's CSRF token (from the events page's forms)."""
    answer = console_sign_in(client, secret, "/ui/events", follow_redirects=True)
    assert answer.status_code == 200, answer.text
    token = CSRF.search(answer.text)
    assert token is not None
    return token.group(1)


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def dead_ids(store: Store) -> set[str]:
    return {d.event_id for d in subscriptions.deliveries(store, failed=True)}


def test_readers_see_dead_letters_operators_redeliver_them(
    db_url: str, store: Store, services_url: str, downstream: Downstream, team: dict[str, str]
) -> None:
    sink = f"{services_url}/sink"
    subscribe_sink(store, services_url)
    downstream.fault("sink.receive", "error", count=1000)  # the endpoint answers 500
    fields = {**FAST_EVENTS, "event_max_age": 0.3}
    with api(db_url, services_url, cookie_secure=False, **fields) as console:
        shop = {"Authorization": f"Bearer {team['shop']}"}
        oid = place(console, headers=shop).json()["id"]
        created = f"{oid}:0"
        wait_until(lambda: len(dead_ids(store)) >= 2, what="both events dead-lettered")
        completed = next(i for i in dead_ids(store) if i != created)

        csrf = sign_in(console, team["auditor"])
        page = console.get("/ui/events")
        assert page.status_code == 200 and "auditor (reader)" in page.text
        assert created in page.text and completed in page.text
        assert label(store, sink) in page.text and sink not in page.text  # an admin's to see
        assert 'class="num dead bad">2<' in page.text  # the destination's dead letters
        assert REDELIVER_BUTTON not in page.text and "Redeliver all" not in page.text
        refused = console.post("/ui/events/redeliver", data={"csrf": csrf, "event": "all"})
        assert refused.status_code == 403
        assert dead_ids(store) == {created, completed}
        assert console.post("/ui/logout", data={"csrf": csrf}).status_code == 200

        csrf = sign_in(console, team["ops-alice"])
        page = console.get("/ui/events")
        assert REDELIVER_BUTTON in page.text and "Redeliver all" in page.text
        downstream.clear_faults()  # the endpoint is back
        delivered = metrics.outbox_delivered(label(store, sink))._value.get()
        for forged in ({"event": created}, {"event": created, "csrf": "not-it"}):
            answer = console.post("/ui/events/redeliver", data=forged, follow_redirects=False)
            assert answer.status_code == 403, answer.text
        assert dead_ids(store) == {created, completed}
        bad = console.post("/ui/events/redeliver", data={"csrf": csrf, "event": "nope"})
        assert "is not an event id" in bad.text  # told, nothing changed
        huge = console.post(  # beyond any column (SQLite's driver: OverflowError)
            "/ui/events/redeliver", data={"csrf": csrf, "event": f"{oid}:{10**20}"}
        )
        assert huge.status_code == 200 and "its seq is out of range" in huge.text, huge.text
        done = console.post(
            "/ui/events/redeliver",
            data={"csrf": csrf, "event": created},
            follow_redirects=False,
        )
        assert done.status_code == 303, done.text
        back = console.get(done.headers["location"])
        # the event and its order's later dead one, both back in line
        assert "2 deliveries back in line" in back.text
        wait_until(lambda: len(sink_seen(services_url)["events"]) == 2, what="the sink")
        wait_until(lambda: subscriptions.lags(store)[label(store, sink)][0] == 0, what="settled")
        # The relay is serve's child process: its deliveries reach serve's /metrics.
        wait_until(
            lambda: metrics.outbox_delivered(label(store, sink))._value.get() - delivered == 2,
            what="the child's deliveries counted in serve's process",
        )
        page = console.get("/ui/events")
        assert "No dead letters." in page.text
        assert page.text.count('class="state state-delivered"') == 2
    seen = sink_seen(services_url)
    assert [e["id"] for e in seen["events"]] == [created, completed]
    assert seen["events"][0]["subject"] == str(uuid.UUID(oid))


def test_only_an_admin_sees_a_webhooks_full_url(
    db_url: str, store: Store, services_url: str, team: dict[str, str]
) -> None:
    """A webhook's path may hold the token that lets anyone post to it (Slack, Discord):
    readers and operators see it named as /metrics names it, in the destinations, the dead
    letters and the latest deliveries alike; an admin sees the URL."""
    token = "XXXXsecretXXXX"
    url = f"{services_url}/hooks/T0000/B0000/{token}"  # answers 404: dead-lettered at once
    subscriptions.add_webhook(store, url, outbox.parse_types(()))  # the default types
    masked = f"<code>{label(store, url)}</code>"
    with api(db_url, services_url, cookie_secure=False, **FAST_EVENTS) as console:
        assert place(console, headers=bearer(team["shop"])).status_code == 201
        wait_until(lambda: len(dead_ids(store)) >= 2, what="both events dead-lettered")
        for name in ("auditor", "ops-alice"):
            page = console.get("/ui/events", headers=bearer(team[name]))
            assert page.status_code == 200, page.text
            assert token not in page.text, name
            # the destination, its two dead letters, its two latest deliveries
            assert page.text.count(masked) == 5, name
        page = console.get("/ui/events", headers=bearer(team["boss"]))
        assert page.text.count(f"<code>{url}</code>") == 5
