"""The operator page in a real browser: Debian's headless Chromium driven by Playwright,
against a real `order-saga serve` (embedded services, migrations, lifespan) in another
process. List -> order -> confirmed action -> the state changed, and a screenshot check.

SQLite only: `serve` migrates a fresh database itself (the storage behaviour behind these
pages runs on both databases in tests/test_ui.py and tests/test_operator.py).
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image, ImageStat

from downstream.seed import ORDINARY_USER_ID, POOR_USER_ID, SOLD_OUT_PRODUCT_ID, WIDGET_ID
from fsm.store import utcnow
from tests.support.processes import Saga, command
from tests.support.services import answers, free_port
from tests.support.waiting import wait_until

CHROMIUM = os.environ.get("ORDER_SAGA_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which(CHROMIUM) is None, reason="no chromium: apt-get install chromium"
    ),
]
TIMEOUT_MS = 30_000


class Served:
    def __init__(self, url: str) -> None:
        self.url = url

    def place(self, user: int, product: int, quantity: int = 1) -> dict[str, Any]:
        body = {"user_id": user, "product_id": product, "quantity": quantity}
        response = httpx.post(f"{self.url}/orders", json=body, timeout=30)
        assert response.status_code in (201, 202, 404), response.text
        return dict(response.json())

    def fault(self, operation: str) -> None:
        body = {"operation": operation, "mode": "error", "count": 1000}
        httpx.post(f"{self.url}/services/_faults", json=body).raise_for_status()

    def clear_faults(self) -> None:
        httpx.delete(f"{self.url}/services/_faults").raise_for_status()

    def order(self, order_id: str) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/orders/{order_id}").json())

    def place_async(self, user: int, product: int) -> dict[str, Any]:
        """202 at once (Prefer: respond-async): the run goes on in `serve`."""
        body = {"user_id": user, "product_id": product, "quantity": 1}
        headers = {"Prefer": "respond-async"}
        response = httpx.post(f"{self.url}/orders", json=body, headers=headers, timeout=30)
        assert response.status_code == 202, response.text
        return dict(response.json())


@pytest.fixture
def settings() -> dict[str, str]:
    """ORDER_SAGA_* of the `serve` under test (a test overrides this fixture to change)."""
    return {"MAX_ATTEMPTS": "2", "BACKOFF_MAX": "0.05"}


@pytest.fixture
def served(tmp_path: Path, settings: dict[str, str]) -> Iterator[Served]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORDER_SAGA_")}
    env |= {
        "ORDER_SAGA_DATABASE_URL": f"sqlite:///{tmp_path}/saga.db",
        "ORDER_SAGA_SERVICES_DB": str(tmp_path / "services.db"),
        "ORDER_SAGA_SHUTDOWN_GRACE": "0",
        **{f"ORDER_SAGA_{k}": v for k, v in settings.items()},
    }
    url = f"http://127.0.0.1:{port}"
    with Saga(command("serve", "--port", str(port), "--no-sweep"), env) as server:
        wait_until(lambda: answers(f"{url}/healthz"), what="serve", alive=server.running)
        yield Served(url)
        server.stop()


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """Debian's chromium, driven by Playwright: launched once for the module's tests an
    xdist worker runs (a launch was ~1-2 s of CPU a test); each test gets its own context
    (`browser_tab`: no cookie, storage or cache of another test)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def browser_tab(browser: Any) -> Iterator[Any]:
    """A page in a fresh context of `browser` (as Browser.new_page makes), closed after use."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        tab = context.new_page()
        tab.set_default_timeout(TIMEOUT_MS)
        yield tab
    finally:
        context.close()


@pytest.fixture
def page(served: Served, chromium: Any) -> Iterator[Any]:
    with browser_tab(chromium) as tab:
        yield tab


def test_list_order_resolve_and_cancel_in_the_browser(served: Served, page: Any) -> None:
    from playwright.sync_api import expect

    completed = served.place(ORDINARY_USER_ID, WIDGET_ID)
    served.place(POOR_USER_ID, WIDGET_ID)  # payment refused: failed
    served.fault("user.refund")
    parked = served.place(ORDINARY_USER_ID, SOLD_OUT_PRODUCT_ID)  # the refund is down: parked
    served.clear_faults()
    assert parked["status"] == "needs_attention"

    page.goto(f"{served.url}/ui")
    first = page.locator("table.orders tbody tr").first
    expect(first).to_have_attribute("data-order", parked["id"])  # parked first
    expect(first).to_contain_text("payment refund did not succeed")
    expect(page.locator('[data-status="needs_attention"] b')).to_have_text("1")

    first.get_by_role("link").click()
    expect(page.locator("#order-status")).to_have_text("needs_attention")
    page.get_by_role("link", name="Mark resolved").click()
    page.get_by_label("Reason").fill("refunded by hand, ticket OPS-42")
    page.get_by_role("button", name="Yes, mark resolved").click()
    expect(page.get_by_role("status")).to_contain_text("now resolved")
    expect(page.locator("#order-status")).to_have_text("resolved")
    expect(page.locator("table.timeline")).to_contain_text("refunded by hand, ticket OPS-42")
    assert served.order(parked["id"])["status"] == "resolved"

    page.goto(f"{served.url}/ui?status=completed")
    page.locator(f'tr[data-order="{completed["id"]}"] a').click()
    page.get_by_role("link", name="Cancel order").click()
    page.get_by_role("button", name="Yes, cancel order").click()
    expect(page.locator("#order-status")).to_have_text("cancelled")
    assert served.order(completed["id"])["status"] == "cancelled"

    page.goto(f"{served.url}/ui")
    expect(page.locator('[data-status="needs_attention"] b')).to_have_text("0")
    expect(page.locator('[data-status="resolved"] b')).to_have_text("1")


def test_pages_render_non_blank(served: Served, page: Any, tmp_path: Path) -> None:
    served.place(ORDINARY_USER_ID, WIDGET_ID)
    failed = served.place(POOR_USER_ID, WIDGET_ID)
    for path, min_height in (("/ui", 400), (f"/ui/orders/{failed['id']}", 1200)):
        page.goto(f"{served.url}{path}")
        shot = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB")
        width, height = shot.size
        assert width == 1280 and min_height <= height <= 20_000, (path, shot.size)
        # Not blank: many colours, and real contrast (text, badges, the diagram).
        assert len(shot.getcolors(maxcolors=1 << 20) or []) > 50, path
        spread = [hi - lo for lo, hi in ImageStat.Stat(shot).extrema]
        assert min(spread) > 150, (path, spread)
    svg_box = page.locator(".diagram svg").bounding_box()
    assert svg_box is not None and svg_box["width"] > 600 and svg_box["height"] > 600
    page.goto(f"{served.url}/ui/heatmap")
    assert page.locator(".diagram svg").bounding_box()["height"] > 300
    assert page.locator("table.heat tbody tr").count() > 10


def test_docs_render_with_nothing_from_outside(served: Served, page: Any) -> None:
    from playwright.sync_api import expect

    asked: list[str] = []
    page.on("request", lambda request: asked.append(request.url))
    page.goto(f"{served.url}/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("order-saga")
    expect(page.locator(".opblock-summary-path").first).to_be_visible()
    outside = [url for url in asked if not url.startswith((served.url, "data:"))]
    assert asked and not outside, outside


# -- why is it here (issue 18): each way an order stands still, on its page and in the list


def test_why_a_parked_order_is_here(served: Served, page: Any) -> None:
    from playwright.sync_api import expect

    served.fault("user.refund")
    parked = served.place(ORDINARY_USER_ID, SOLD_OUT_PRODUCT_ID)
    served.clear_faults()
    page.goto(f"{served.url}/ui/orders/{parked['id']}")
    why = page.locator("#why")
    expect(why).to_have_attribute("data-kind", "parked")
    expect(why).to_contain_text("payment refund did not succeed")
    expect(why).to_contain_text("the sweep retries it at")
    expect(page.locator("table.timeline tr.attempt").first).to_contain_text("payment:refund")


def test_why_an_order_waits_for_its_next_attempt(served: Served, page: Any) -> None:
    from playwright.sync_api import expect

    served.fault("user.deduct")  # two attempts (MAX_ATTEMPTS=2), then the run gives up
    waiting = served.place(ORDINARY_USER_ID, WIDGET_ID)
    served.clear_faults()
    assert waiting["status"] == "running"
    page.goto(f"{served.url}/ui")
    row = page.locator(f'tr[data-order="{waiting["id"]}"]')
    expect(row).to_contain_text("next attempt of payment:deduct")
    row.get_by_role("link").click()
    why = page.locator("#why")
    expect(why).to_have_attribute("data-kind", "waiting_for_next_attempt")
    expect(why).to_contain_text("2 attempts failed so far, at most 2 per run")
    expect(why).to_contain_text("500")  # the last error
    failed = page.locator("table.timeline tr.attempt")
    expect(failed).to_have_count(2)  # each failed attempt in the timeline, not a transition
    expect(failed.last).to_contain_text("payment:deduct attempt 2 failed")


def test_why_an_order_with_an_expired_lease_is_here(
    served: Served, page: Any, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    from fsm.wiring import build_store
    from tests.support.settings import saga_settings

    store = build_store(saga_settings(f"sqlite:///{tmp_path}/saga.db", lease_seconds=0.3))
    try:

        async def abandoned() -> Any:  # a driver that claimed an order, then died
            made, _ = await store.create_order(
                user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1
            )
            return await store.claim(order_id=made.id, owner="host-b:4242:gone")

        with ThreadPoolExecutor(1) as pool:  # Playwright's loop runs in this thread
            held = pool.submit(asyncio.run, abandoned()).result()
    finally:
        store.close()
        store.engine.dispose()
    assert held is not None and held.lease_expires_at is not None
    # the page reads the lease once, when it loads: load it only after the lease has run out
    wait_until(lambda: utcnow() > held.lease_expires_at, timeout=5, what="the lease to run out")
    page.goto(f"{served.url}/ui/orders/{held.id}")
    why = page.locator("#why")
    expect(why).to_have_attribute("data-kind", "lease_expired")
    expect(why).to_contain_text("lease of host-b:4242:gone expired at")


@pytest.mark.parametrize(
    "settings",
    [
        {
            "BREAKER_THRESHOLD": "1",
            "BREAKER_COOLDOWN": "600",
            "STEP_DEADLINE": "600",
            "RESPOND_WITHIN": "0",
        }
    ],
    ids=["breaker"],
)
def test_why_an_order_waits_on_an_open_breaker(served: Served, page: Any) -> None:
    from playwright.sync_api import expect

    served.fault("user.deduct")  # one failure opens the user breaker for ten minutes
    held = served.place_async(ORDINARY_USER_ID, WIDGET_ID)
    page.goto(f"{served.url}/ui/orders/{held['id']}")
    why = page.locator("#why")
    # The page reloads itself until the executor has recorded its wait on the breaker.
    expect(why).to_have_attribute("data-kind", "waiting_on_breaker", timeout=30_000)
    expect(why).to_contain_text("waiting on the user.deduct circuit breaker (probe at")
    api = served.order(held["id"])["why"]
    assert (api["kind"], api["service"], api["call"]) == (
        "waiting_on_breaker",
        "user.deduct",
        "payment:deduct",
    )
    served.clear_faults()


def test_find_an_order_by_the_start_of_its_id(served: Served, page: Any) -> None:
    from playwright.sync_api import expect

    wanted = served.place(ORDINARY_USER_ID, WIDGET_ID)
    others = [served.place(POOR_USER_ID, WIDGET_ID) for _ in range(3)]
    assert all(o["id"][:8] != wanted["id"][:8] for o in others)
    page.goto(f"{served.url}/ui")
    page.get_by_label("order id").fill(wanted["id"][:8])
    page.get_by_role("button", name="Find").click()
    rows = page.locator("table.orders tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.first).to_have_attribute("data-order", wanted["id"])
    expect(rows.first.locator("code.order-id")).to_have_text(wanted["id"])  # the full id
    page.get_by_label("order id").fill(wanted["id"])  # all of it: straight to its page
    page.get_by_role("button", name="Find").click()
    expect(page.locator("#order-status")).to_have_text("completed")


def test_auto_refresh_can_be_paused(served: Served, page: Any) -> None:
    from playwright.sync_api import expect

    page.goto(f"{served.url}/ui")
    control = page.locator("#auto-refresh")
    expect(control).to_be_checked()
    expect(page.locator("#auto-refresh-status")).to_have_text("every 10 s")
    control.uncheck()
    expect(page.locator("#auto-refresh-status")).to_have_text("paused")
    page.reload()
    expect(page.locator("#auto-refresh")).not_to_be_checked()  # remembered


# -- order events (issue 19): a dead letter redelivered from the console ------------------

EVENTS_TOKEN = "events-page-admin-token"


@pytest.mark.parametrize(
    "settings",
    [
        {
            "API_TOKEN": EVENTS_TOKEN,  # signing in is enforced: the operator signs in
            "EVENT_MAX_AGE": "0.3",  # a failing delivery is dead-lettered at once
            "EVENT_BACKOFF_BASE": "0.05",
            "EVENT_BACKOFF_MAX": "0.1",
            "RELAY_INTERVAL": "0.05",
        }
    ],
    ids=["events"],
)
def test_a_dead_letter_is_redelivered_from_the_events_page(
    served: Served, page: Any, tmp_path: Path, services_url: str
) -> None:
    import json

    from playwright.sync_api import expect

    from fsm import keys, outbox_sql
    from fsm.roles import Role
    from fsm.store import make_engine
    from tests.support.processes import run_cli
    from tests.support.services import Downstream

    database = f"sqlite:///{tmp_path}/saga.db"
    engine = make_engine(database)
    try:
        operator_key = keys.create_key(engine=engine, name="ops-alice", role=Role.OPERATOR)
    finally:
        engine.dispose()
    sink = f"{services_url}/sink"
    added = run_cli("webhooks", "add", sink, "--json", ORDER_SAGA_DATABASE_URL=database)
    assert added.returncode == 0, added.stderr
    hook = json.loads(added.stdout)
    httpx.put(f"{sink}/secret", json={"secret": hook["secret"]})
    shown = f"webhook:{hook['id']} {outbox_sql.origin(sink)}"  # an operator's view of it
    downstream = Downstream(services_url)
    downstream.fault("sink.receive", "error", count=1000)  # the endpoint answers 500
    admin = {"Authorization": f"Bearer {EVENTS_TOKEN}"}
    body = {"user_id": ORDINARY_USER_ID, "product_id": WIDGET_ID, "quantity": 1}
    placed = httpx.post(f"{served.url}/orders", json=body, headers=admin, timeout=30)
    assert placed.status_code == 201, placed.text
    created = f"{placed.json()['id']}:0"

    def events_page() -> str:
        return httpx.get(f"{served.url}/ui/events", headers=admin).text

    wait_until(lambda: 'class="num dead bad">2<' in events_page(), what="two dead letters")

    page.goto(f"{served.url}/ui/events")  # to the sign-in page, then back here
    page.get_by_label("API key").fill(operator_key)
    page.get_by_role("button", name="Sign in with a key").click()
    expect(page.locator("header .whoami")).to_contain_text("ops-alice (operator)")
    row = page.locator(f'table.dead-letters tr[data-event="{created}"]')
    expect(row).to_contain_text("HTTP 500")
    expect(page.locator(f'tr[data-destination="{shown}"] td.dead')).to_have_text("2")
    expect(page.locator("main")).not_to_contain_text(sink)  # its URL is an admin's to see
    downstream.clear_faults()  # the endpoint recovers
    row.get_by_role("button", name="Redeliver").click()
    expect(page.get_by_role("status")).to_contain_text("2 deliveries back in line")

    wait_until(lambda: events_page().count("state state-delivered") == 2, what="delivered")
    page.reload()
    expect(page.locator("#no-dead-letters")).to_be_visible()
    state = page.locator(f'table.deliveries tr[data-event="{created}"] td.state')
    expect(state).to_have_text("delivered")
    expect(page.locator(f'tr[data-destination="{shown}"] td.pending')).to_have_text("0")
    seen = httpx.get(sink).json()
    assert [e["id"] for e in seen["events"]][:1] == [created]  # the sink received it, first
    assert len(seen["events"]) == 2 and seen["rejected"] == 0


# -- each role in the browser (issue 17): one `serve` with keys for the module's role tests

ROLES_TOKEN = "roles-page-admin-token"


class Team:
    """A `serve` with authentication on, one key per role, and the admin's own calls."""

    def __init__(self, url: str, database_url: str, secrets: dict[str, str]) -> None:
        self.url, self.database_url, self.secrets = url, database_url, secrets
        self.admin = {"Authorization": f"Bearer {ROLES_TOKEN}"}

    def place(self, key: str, product: int = WIDGET_ID) -> dict[str, Any]:
        body = {"user_id": ORDINARY_USER_ID, "product_id": product, "quantity": 1}
        auth = {"Authorization": f"Bearer {self.secrets[key]}"}
        response = httpx.post(f"{self.url}/orders", json=body, headers=auth, timeout=30)
        assert response.status_code in (201, 202), response.text  # 202: parked, not ended
        return dict(response.json())

    def order(self, order_id: str) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/orders/{order_id}", headers=self.admin).json())

    def history(self, order_id: str) -> list[dict[str, Any]]:
        answer = httpx.get(f"{self.url}/orders/{order_id}/transitions", headers=self.admin)
        return list(answer.json())

    def fault(self, operation: str | None) -> None:
        faults = f"{self.url}/services/_faults"
        if operation is None:
            httpx.delete(faults, headers=self.admin).raise_for_status()
            return
        body = {"operation": operation, "mode": "error", "count": 1000}
        httpx.post(faults, json=body, headers=self.admin).raise_for_status()


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Team]:
    from fsm import keys
    from fsm.roles import Role
    from fsm.store import make_engine
    from tests.support.serving import Served as Serve
    from tests.support.settings import saga_env

    directory = tmp_path_factory.mktemp("roles")
    database = f"sqlite:///{directory}/saga.db"
    env = saga_env(
        database_url=database,
        services_db=str(directory / "services.db"),
        api_token=ROLES_TOKEN,
        shutdown_grace=0,
        max_attempts=2,
        backoff_max=0.05,
    )
    server = Serve(env).wait_ready()  # it made the schema
    try:
        engine = make_engine(database)
        try:
            made = {"shop": Role.CLIENT, "auditor": Role.READER, "ops-carol": Role.OPERATOR}
            secrets = {n: keys.create_key(engine=engine, name=n, role=r) for n, r in made.items()}
        finally:
            engine.dispose()
        yield Team(server.url, database, secrets)
    finally:
        output = server.stop()
    for secret in (ROLES_TOKEN, *secrets.values()):
        assert secret not in output  # never in serve's log


@pytest.fixture
def tab(team: Team, chromium: Any) -> Iterator[Any]:
    with browser_tab(chromium) as opened:
        yield opened


def _sign_in(tab: Any, team: Team, key: str, path: str = "/ui") -> None:
    from playwright.sync_api import expect

    tab.goto(f"{team.url}{path}")
    expect(tab).to_have_url(f"{team.url}/ui/login?next={path}")  # no session: sign in first
    tab.get_by_label("API key").fill(team.secrets[key])
    tab.get_by_role("button", name="Sign in with a key").click()


@pytest.mark.xdist_group("browser-roles")
def test_a_reader_sees_the_orders_without_actions_and_a_forged_action_is_refused(
    team: Team, tab: Any
) -> None:
    from playwright.sync_api import expect

    placed = team.place("shop")  # completed: an operator could cancel it
    _sign_in(tab, team, "auditor")
    expect(tab.locator("header .whoami")).to_contain_text("auditor (reader)")
    row = tab.locator(f'table.orders tr[data-order="{placed["id"]}"]')
    expect(row).to_contain_text("completed")
    row.get_by_role("link").click()
    expect(tab.locator("#order-status")).to_have_text("completed")
    expect(tab.locator("section.actions")).to_have_count(0)
    expect(tab.locator('[class*="action-"]')).to_have_count(0)
    # The cancel form forged from this page, with its own valid CSRF token: the role
    # refuses it (403), and the order is untouched.
    forged = tab.evaluate(
        """async (id) => {
            const body = new URLSearchParams({
                csrf: document.querySelector('form.whoami input[name=csrf]').value,
                reason: 'forged',
            });
            const answer = await fetch(`/ui/orders/${id}/cancel`, {method: 'POST', body});
            return answer.status;
        }""",
        placed["id"],
    )
    assert forged == 403
    confirm = tab.goto(f"{team.url}/ui/orders/{placed['id']}/cancel")
    assert confirm is not None and confirm.status == 403  # nor its confirmation page
    assert team.order(placed["id"])["status"] == "completed"
    assert [t for t in team.history(placed["id"]) if t["scope"] == "operator"] == []


@pytest.mark.xdist_group("browser-roles")
def test_the_login_page_is_styled_before_signing_in(team: Team, tab: Any) -> None:
    """Once authentication was on, /ui/static answered 401 to a browser not yet signed
    in: the sign-in page came without its stylesheet and script."""
    from playwright.sync_api import expect

    assets: dict[str, int] = {}

    def note(response: Any) -> None:
        if "/ui/static/" in response.url:
            assets[response.url.rsplit("/", 1)[-1]] = response.status

    tab.on("response", note)
    tab.goto(f"{team.url}/ui")
    expect(tab).to_have_url(f"{team.url}/ui/login?next=/ui")
    tab.wait_for_load_state("load")  # the deferred script too
    assert assets == {"ui.css": 200, "ui.js": 200}
    background = tab.evaluate("getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(250, 250, 250)"  # ui.css's page, not the browser's default


@pytest.mark.xdist_group("browser-roles")
def test_a_client_key_does_not_open_the_console(team: Team, tab: Any) -> None:
    from playwright.sync_api import expect

    from api.session import COOKIE

    team.place("shop")
    _sign_in(tab, team, "shop")
    expect(tab.get_by_role("alert")).to_contain_text("the client role has no console")
    expect(tab).to_have_url(f"{team.url}/ui/login")  # still signing in
    assert COOKIE not in {c["name"] for c in tab.context.cookies()}
    tab.goto(f"{team.url}/ui")
    expect(tab).to_have_url(f"{team.url}/ui/login?next=/ui")


@pytest.mark.xdist_group("browser-roles")
def test_a_sign_in_form_on_another_site_does_not_sign_the_browser_in(team: Team, tab: Any) -> None:
    """Login CSRF: a page elsewhere posting the attacker's key to /ui/login."""
    from playwright.sync_api import expect
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import HTMLResponse
    from starlette.routing import Route

    from api.session import COOKIE
    from tests.support.services import LiveServer

    def lure(_: Request) -> HTMLResponse:
        return HTMLResponse(
            f'<form method="post" action="{team.url}/ui/login">'
            f'<input type="hidden" name="key" value="{team.secrets["auditor"]}">'
            '<input type="hidden" name="next" value="/ui"><button>Win a prize</button></form>'
        )

    with LiveServer(Starlette(routes=[Route("/", lure)])) as elsewhere:
        tab.goto(elsewhere.url)
        tab.get_by_role("button", name="Win a prize").click()
        expect(tab.get_by_role("alert")).to_contain_text("sent from another site")
    assert COOKIE not in {c["name"] for c in tab.context.cookies()}
    _sign_in(tab, team, "auditor")  # from the console's own page: signed in
    expect(tab.locator("header .whoami")).to_contain_text("auditor (reader)")


@pytest.mark.xdist_group("browser-roles")
def test_an_operator_acts_and_the_log_names_its_key(team: Team, tab: Any) -> None:
    from playwright.sync_api import expect

    team.fault("user.refund")
    parked = team.place("shop", product=SOLD_OUT_PRODUCT_ID)  # the refund is down: parked
    team.fault(None)
    assert parked["status"] == "needs_attention"
    _sign_in(tab, team, "ops-carol", f"/ui/orders/{parked['id']}")
    expect(tab.locator("header .whoami")).to_contain_text("ops-carol (operator)")
    tab.get_by_role("link", name="Mark resolved").click()
    tab.get_by_label("Reason").fill("refunded by hand, OPS-77")
    tab.get_by_role("button", name="Yes, mark resolved").click()
    expect(tab.locator("#order-status")).to_have_text("resolved")
    assert team.order(parked["id"])["status"] == "resolved"
    log = team.history(parked["id"])
    (audit,) = [t for t in log if t["scope"] == "operator"]
    assert audit["trigger"] == "resolve"
    assert {k: audit["detail"].get(k) for k in ("by", "as", "via", "channel")} == {
        "by": "ops-carol",
        "as": "operator",
        "via": "key",
        "channel": "console",
    }
    (resolved,) = [t for t in log if t["trigger"] == "resolve" and t["scope"] == "order"]
    assert resolved["detail"]["operator"] == "ops-carol"
