"""The operator page over HTTP (TestClient, lifespan included, real services), on SQLite and
PostgreSQL: the list with counts, filters and parked orders first; one order's page and its
lit diagram coloured by outcome; the confirmed actions; the heatmap; /docs with no asset
from outside; request ids. The same flows in a real browser: tests/test_browser.py."""

from __future__ import annotations

import asyncio
import re
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from downstream.seed import (
    MISSING_PRODUCT_ID,
    ORDINARY_USER_ID,
    POOR_USER_ID,
    SOLD_OUT_PRODUCT_ID,
    WIDGET_ID,
)
from fsm.executor import Executor
from fsm.machine import AUDIT_SCOPE, OrderTrigger
from fsm.store import Store
from fsm.wiring import build_executor
from tests.support.api import API
from tests.support.services import Downstream
from tests.support.settings import saga_settings
from tests.support.waiting import wait_until

GREEN, RED = "#81c784", "#e57373"  # fsm.diagram: where a completed / failed order rests


@pytest.fixture
def client(db_url: str, services_url: str) -> Iterator[TestClient]:
    app = create_app(saga_settings(db_url, services_url, **API, max_attempts=2), sweep=False)
    with TestClient(app) as c:
        yield c


def place(client: TestClient, user: int, product: int, quantity: int = 1) -> str:
    response = client.post(
        "/orders", json={"user_id": user, "product_id": product, "quantity": quantity}
    )
    assert response.status_code in (201, 202, 404), response.text
    return str(response.json()["id"])


def park(client: TestClient, downstream: Downstream) -> str:
    downstream.fault("user.refund", "error", count=1000)
    order_id = place(client, ORDINARY_USER_ID, SOLD_OUT_PRODUCT_ID)
    httpx.delete(f"{downstream.url}/_faults").raise_for_status()
    assert client.get(f"/orders/{order_id}").json()["status"] == "needs_attention"
    return order_id


def rows(html: str) -> list[str]:
    return re.findall(r'<tr class="status-[a-z_]+" data-order="([0-9a-f-]+)"', html)


def current_fill(svg: str, state: str) -> str:
    """The fill of the node dot marked current for `state` in Graphviz's SVG."""
    match = re.search(
        rf'<g id="node\d+" class="node visited current">\s*<title>{state}</title>\s*'
        r'<path fill="(#[0-9a-f]{6})"',
        svg,
    )
    assert match, f"{state} is not the current node"
    return match.group(1)


def test_list_counts_filters_and_parked_first(client: TestClient, downstream: Downstream) -> None:
    done = place(client, ORDINARY_USER_ID, WIDGET_ID)
    parked = park(client, downstream)
    failed = place(client, POOR_USER_ID, WIDGET_ID)
    page = client.get("/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert rows(page.text) == [parked, failed, done]  # parked first, then newest first
    assert re.search(r'data-status="needs_attention">needs_attention <b>1</b>', page.text)
    assert re.search(r'data-status="cancelled">cancelled <b>0</b>', page.text)
    assert "payment refund did not succeed" in page.text and "sweep retries at" in page.text
    assert rows(client.get("/ui", params={"status": "failed"}).text) == [failed]
    assert rows(client.get("/ui", params={"user": POOR_USER_ID}).text) == [failed]
    assert rows(client.get("/ui", params={"product": SOLD_OUT_PRODUCT_ID}).text) == [parked]
    assert rows(client.get("/ui", params={"state": "completed"}).text) == [done]
    assert rows(client.get("/ui", params={"older_than": 3600}).text) == []
    assert client.get("/ui", params={"status": "lost"}).status_code == 422


def test_paging(client: TestClient) -> None:
    # rejected: cheap to make
    ids = [place(client, ORDINARY_USER_ID, MISSING_PRODUCT_ID) for _ in range(27)]
    first = client.get("/ui").text
    assert rows(first) == ids[::-1][:25] and 'rel="next"' in first and 'rel="prev"' not in first
    second = client.get("/ui", params={"offset": 25}).text
    assert rows(second) == ids[::-1][25:] and 'rel="prev"' in second and 'rel="next"' not in second


def test_order_page_shows_steps_timeline_and_outcome(
    client: TestClient, store: Store, downstream: Downstream
) -> None:
    failed = place(client, POOR_USER_ID, WIDGET_ID)
    page = client.get(f"/ui/orders/{failed}").text
    assert '<span class="badge status-failed" id="order-status">failed</span>' in page
    assert "402" in page  # the downstream answer that failed the payment
    history = store.history(uuid.UUID(failed))
    assert len(re.findall(r'<tr class="scope-', page)) == len(history)
    assert page.count("<svg") == 1 and "<?xml" not in page  # inline, without the prolog
    assert current_fill(page, "failed") == RED  # a failed order never looks completed
    completed = client.get(f"/ui/orders/{place(client, ORDINARY_USER_ID, WIDGET_ID)}").text
    assert current_fill(completed, "completed") == GREEN
    assert "action-cancel" in completed and "action-resolve" not in completed
    assert client.get(f"/ui/orders/{uuid.uuid4()}").status_code == 404


def test_resolve_needs_confirmation_and_a_reason(
    client: TestClient, store: Store, downstream: Downstream
) -> None:
    parked = park(client, downstream)
    page = client.get(f"/ui/orders/{parked}").text
    assert "action-resolve" in page and "action-retry" in page and "action-cancel" not in page
    confirm = client.get(f"/ui/orders/{parked}/resolve")
    assert confirm.status_code == 200 and 'name="reason"' in confirm.text
    assert store.get(uuid.UUID(parked)).state == "needs_attention"  # asking changes nothing
    completed = place(client, ORDINARY_USER_ID, WIDGET_ID)
    offered = client.get(f"/ui/orders/{completed}/resolve").text
    assert "Not possible while the order is completed" in offered and "<form" not in offered
    empty = client.post(f"/ui/orders/{parked}/resolve", data={"reason": " "})
    assert "a reason is required" in empty.text
    assert store.get(uuid.UUID(parked)).state == "needs_attention"
    done = client.post(f"/ui/orders/{parked}/resolve", data={"reason": "refunded by hand"})
    assert done.status_code == 200 and done.url.path == f"/ui/orders/{parked}"
    assert "Mark resolved: now resolved (resolved)" in done.text
    assert store.history(uuid.UUID(parked))[-1].detail["reason"] == "refunded by hand"  # type: ignore[index]
    log = store.history(uuid.UUID(parked))
    again = client.post(f"/ui/orders/{parked}/resolve", data={"reason": "again"})
    assert "Mark resolved: already resolved" in again.text  # a second submit: idempotent
    assert store.history(uuid.UUID(parked)) == log


def test_retry_and_cancel_from_the_page(
    client: TestClient, store: Store, downstream: Downstream
) -> None:
    parked = park(client, downstream)
    retried = client.post(f"/ui/orders/{parked}/retry")
    assert "Retry compensation: now failed (failed)" in retried.text
    completed = place(client, ORDINARY_USER_ID, WIDGET_ID)
    cancelled = client.post(f"/ui/orders/{completed}/cancel")
    assert "Cancel order: now cancelled (cancelled)" in cancelled.text
    assert downstream.shipment(completed)["status"] == "cancelled"  # type: ignore[index]
    failed = place(client, POOR_USER_ID, WIDGET_ID)
    refused = client.post(f"/ui/orders/{failed}/cancel")
    assert "Cancel order: not possible while the order is failed" in refused.text
    assert client.get(f"/ui/orders/{completed}/explode").status_code == 422


def test_a_retry_in_flight_is_not_shown_as_parked(
    client: TestClient, downstream: Downstream
) -> None:
    """While the page's Retry runs the order is compensating: the page showed "Needs
    attention ... The sweep retries at" and "next attempt of payment:refund at" the park's
    pause, though the refund was being called right then."""
    parked = park(client, downstream)
    before = client.get(f"/ui/orders/{parked}").text
    assert '<div class="attention">' in before
    assert "(or now: Retry compensation on its page)" in before  # the button, here
    downstream.fault("user.refund", "delay", count=1, seconds=0.8)  # answered in time
    retry = threading.Thread(target=client.post, args=(f"/ui/orders/{parked}/retry",))
    retry.start()
    try:

        def in_flight() -> str | None:  # retry_compensation fired, the refund called
            page = client.get(f"/ui/orders/{parked}").text
            compensating = '<dd id="order-state">compensating</dd>' in page
            return page if compensating and 'data-kind="leased"' in page else None

        page = wait_until(in_flight, what="the retry to show as driven", alive=retry.is_alive)
        assert '<div class="attention">' not in page and "The sweep retries at" not in page
        assert "next attempt" not in page
    finally:
        retry.join()
        downstream.clear_faults()


def test_a_reason_left_on_an_order_that_is_not_parked_is_not_shown(
    client: TestClient, store: Store
) -> None:
    """A park's reason is cleared by the retry edges; one left on a row from before (or
    written by hand) is not "needs attention" / "Parked because" anywhere: the order's
    page, an action's confirmation, the API."""
    from sqlalchemy import text

    completed = place(client, ORDINARY_USER_ID, WIDGET_ID)
    with store.engine.begin() as conn:
        conn.execute(
            text("UPDATE orders SET attention_reason = 'refund did not succeed' WHERE id = :id"),
            {
                "id": uuid.UUID(completed).hex
                if store.engine.dialect.name == "sqlite"
                else completed
            },
        )
    assert store.get(uuid.UUID(completed)).attention_reason == "refund did not succeed"
    assert client.get(f"/orders/{completed}").json()["attention_reason"] is None
    assert "refund did not succeed" not in client.get(f"/ui/orders/{completed}").text
    confirm = client.get(f"/ui/orders/{completed}/cancel")
    assert confirm.status_code == 200 and "<form" in confirm.text
    assert "Parked because" not in confirm.text and "refund did not succeed" not in confirm.text


def test_an_action_that_outlasts_respond_within_answers_and_the_run_goes_on(
    db_url: str, services_url: str, downstream: Downstream
) -> None:
    """The page's Retry waits for its run at most RESPOND_WITHIN, as the API's actions
    (api.runner), then says it is still running; the run finishes in the background."""
    fields = API | {"max_attempts": 2, "respond_within": 0.2}
    with TestClient(
        create_app(saga_settings(db_url, services_url, **fields), sweep=False)
    ) as client:
        downstream.fault("user.refund", "error", count=2)  # the run's 2 attempts: parked
        parked = place(client, ORDINARY_USER_ID, SOLD_OUT_PRODUCT_ID)
        wait_until(
            lambda: client.get(f"/orders/{parked}").json()["state"] == "needs_attention",
            what="the order to park",
        )
        downstream.fault("user.refund", "delay", count=1, seconds=1.0)
        retried = client.post(f"/ui/orders/{parked}/retry")
        assert retried.status_code == 200 and retried.url.path == f"/ui/orders/{parked}"
        assert "Retry compensation: still running, now compensating" in retried.text
        wait_until(
            lambda: client.get(f"/orders/{parked}").json()["state"] == "failed",
            what="the retry to finish in the background",
        )


@pytest.mark.parametrize("action", ["resume", "retry", "cancel", "resolve"])
def test_an_action_outside_its_states_is_refused_and_does_nothing(
    client: TestClient, store: Store, action: str
) -> None:
    """The confirmation page says "Not possible while the order is ..."; a POST sent anyway
    (an old tab, a crafted form) is refused the same way: no audit row, no move."""
    waiting, _ = asyncio.run(
        store.create_order(user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1)
    )
    completed = place(client, ORDINARY_USER_ID, WIDGET_ID)
    # each action's one state it is not offered in: a pending order may only be resumed,
    # a completed one only cancelled
    order_id = completed if action == "resume" else str(waiting.id)
    before = store.get(uuid.UUID(order_id))
    confirm = client.get(f"/ui/orders/{order_id}/{action}")
    assert f"Not possible while the order is {before.state}" in confirm.text
    sent = client.post(f"/ui/orders/{order_id}/{action}", data={"reason": "sent anyway"})
    assert sent.status_code == 200 and sent.url.path == f"/ui/orders/{order_id}"
    assert f"not possible while the order is {before.state}" in sent.text
    after = store.get(uuid.UUID(order_id))
    assert (after.state, after.version) == (before.state, before.version)
    assert [t for t in store.history(uuid.UUID(order_id)) if t.scope == AUDIT_SCOPE] == []


class SweepFirst:
    """The app's store as its executor sees it, except that right before the executor's
    next claim another worker (the sweep) drives the order and lets it go: what can
    happen between a check made before the claim and the claim."""

    def __init__(self, store: Store, sweep: Callable[[uuid.UUID], Awaitable[Any]]) -> None:
        self._store, self._sweep = store, sweep

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def claim(self, *, order_id: uuid.UUID, owner: str) -> Any:
        sweep, self._sweep = self._sweep, None
        if sweep is not None:
            await sweep(order_id)
        return await self._store.claim(order_id=order_id, owner=owner)


def test_an_action_is_checked_against_the_state_it_acts_on(
    client: TestClient, store: Store, downstream: Downstream
) -> None:
    """The console read the order's state, then the executor claimed it: had the sweep
    moved the order in between, it was driven anyway under the button's audit row (a
    resume of a waiting order the sweep had just parked fired retry_compensation, logged
    as the operator's resume). The state is now checked under the lease."""
    waiting, _ = asyncio.run(
        store.create_order(user_id=ORDINARY_USER_ID, product_id=SOLD_OUT_PRODUCT_ID, quantity=1)
    )
    executor: Executor = client.app.state.executor  # type: ignore[attr-defined]
    real = executor.store

    async def sweep(order_id: uuid.UUID) -> None:
        settings = client.app.state.settings  # type: ignore[attr-defined]
        other = build_executor(settings, store=real, services=executor.services)
        downstream.fault("user.refund", "error", count=1000)
        try:
            await other.run(order_id)  # the refund is down: parked
        finally:
            await other.aclose()
            downstream.clear_faults()  # (a retry of the compensation would now succeed)

    executor.store = SweepFirst(real, sweep)  # type: ignore[assignment]
    try:
        sent = client.post(f"/ui/orders/{waiting.id}/resume", data={"reason": "INC-1"})
    finally:
        executor.store = real
    assert sent.status_code == 200 and sent.url.path == f"/ui/orders/{waiting.id}"
    assert "Resume: not possible while the order is needs_attention" in sent.text, sent.text
    log = store.history(waiting.id)
    assert [t for t in log if t.scope == AUDIT_SCOPE] == []
    assert [t.trigger for t in log if t.trigger == OrderTrigger.RETRY_COMPENSATION] == []
    assert store.get(waiting.id).state == "needs_attention"


def test_a_page_shows_only_the_messages_the_console_signed_for_it(
    client: TestClient, store: Store, downstream: Downstream
) -> None:
    """A link from anywhere cannot make the console speak in its own voice."""
    fake = "Your session expired. Sign in again at https://evil.example/order-saga/login"
    completed = place(client, ORDINARY_USER_ID, WIDGET_ID)
    for path in (f"/ui/orders/{completed}", "/ui/events"):
        for params in ({"error": fake}, {"done": fake}, {"message": fake}):
            page = client.get(path, params=params)
            assert page.status_code == 200, page.text
            assert "evil.example" not in page.text and 'class="flash' not in page.text
    # the console's own, through the redirect after an action
    sent = client.post(f"/ui/orders/{completed}/cancel", follow_redirects=False)
    assert sent.status_code == 303
    shown = client.get(sent.headers["location"])
    assert shown.url.path == f"/ui/orders/{completed}"
    assert "Cancel order: now cancelled (cancelled)" in shown.text
    signed = parse_qs(urlsplit(sent.headers["location"]).query)["message"][0]
    other = place(client, ORDINARY_USER_ID, WIDGET_ID)
    altered = signed[:-4] + ("AAAA" if not signed.endswith("AAAA") else "BBBB")
    for path, value in ((f"/ui/orders/{other}", signed), (f"/ui/orders/{completed}", altered)):
        page = client.get(path, params={"message": value})  # another page's, or forged
        assert page.status_code == 200 and 'class="flash' not in page.text


def test_heatmap_page(client: TestClient, downstream: Downstream) -> None:
    place(client, ORDINARY_USER_ID, WIDGET_ID)
    place(client, POOR_USER_ID, WIDGET_ID)
    page = client.get("/ui/heatmap").text
    assert page.count("<svg") == 1
    assert "all_succeeded ×1" in page and "some_failed ×1" in page and "resolve ×0" in page
    assert re.search(r"<td>order</td><td>completed</td><td class=\"num\">1</td>", page)
    assert re.search(r"<td>order</td><td>pending</td><td class=\"num\">2</td>", page)  # created
    hour = client.get("/ui/heatmap", params={"window": "hour"})
    assert hour.status_code == 200 and 'class="on" data-window="hour"' in hour.text
    assert client.get("/ui/heatmap", params={"window": "week"}).status_code == 422


def test_pages_need_the_token_when_one_is_set(db_url: str, services_url: str) -> None:
    app = create_app(saga_settings(db_url, services_url, **API, api_token="s3cret"), sweep=False)
    with TestClient(app) as c:
        assert c.get("/ui").status_code == 401
        assert c.get("/ui", headers={"Authorization": "Bearer s3cret"}).status_code == 200


@pytest.mark.parametrize(
    "path", [pytest.param("/docs", id="docs"), pytest.param("/redoc", id="redoc")]
)
def test_docs_work_offline(client: TestClient, path: str) -> None:
    html = client.get(path).text
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert assets and all(a.startswith("/") for a in assets), assets  # nothing external
    for asset in assets:
        fetched = client.get(asset)
        assert fetched.status_code == 200, asset
        if asset.endswith(".js"):  # nor anything the scripts draw (ReDoc's logo was a CDN's)
            assert "cdn.redoc.ly" not in fetched.text and "cdn.jsdelivr" not in fetched.text


def test_static_files_are_served_and_lines_carry_request_ids(client: TestClient) -> None:
    assert client.get("/ui/static/ui.css").status_code == 200
    response = client.get("/healthz", headers={"X-Request-ID": "3f2b8c1e9a7d4e6f8b0c1d2e3f4a5b6c"})
    assert response.headers["x-request-id"] == "3f2b8c1e9a7d4e6f8b0c1d2e3f4a5b6c"
    assert len(client.get("/healthz").headers["x-request-id"]) == 32  # made up when absent
