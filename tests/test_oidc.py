"""Issue 17, item 3: the console signs in with OpenID Connect (authorization code + PKCE)
against a real local provider (tests/support/oidc.py), and the browser — Debian's
headless Chromium driven by Playwright against a real `order-saga serve` — signs in with
a key and with OIDC, acts as an operator, and the transition row names that operator."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from downstream.seed import ORDINARY_USER_ID, WIDGET_ID
from fsm import keys
from fsm.machine import AUDIT_SCOPE
from fsm.roles import Role
from fsm.store import Store, make_engine
from fsm.wiring import build_store
from tests.support.api import api
from tests.support.oidc import CLIENT_ID, CLIENT_SECRET, Provider, User, provider_app
from tests.support.processes import run_cli
from tests.support.services import LiveServer, free_port
from tests.support.serving import Served
from tests.support.settings import cli_settings, saga_env, saga_settings
from tests.support.waiting import wait_until

CHROMIUM = os.environ.get("ORDER_SAGA_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
CODE = re.compile(r'name="code" value="([^"]+)"')
OPERATORS = "saga-operators"
BOOTSTRAP = "bootstrap-token"


@pytest.fixture(scope="module")
def idp() -> Iterator[Provider]:
    provider = Provider(user=User("alice-0001", "alice@example.com", [OPERATORS]))
    with LiveServer(provider_app(provider)) as server:
        provider.issuer = server.url
        yield provider


def oidc_settings(idp: Provider) -> dict[str, Any]:
    return {
        "oidc_issuer": idp.issuer,
        "oidc_client_id": CLIENT_ID,
        "oidc_client_secret": CLIENT_SECRET,
        "oidc_roles": {OPERATORS: "operator", "saga-readers": "reader"},
        "cookie_secure": False,
    }


def test_code_flow_with_pkce_signs_in_with_the_mapped_role(
    db_url: str, services_url: str, store: Store, idp: Provider
) -> None:
    keys.create_key(engine=store.engine, name="someone", role=Role.READER)  # auth is on
    with api(db_url, services_url, **oidc_settings(idp)) as app:
        assert "single sign-on" in app.get("/ui/login").text
        start = app.get("/ui/oidc/login?next=/ui/heatmap", follow_redirects=False)
        assert start.status_code == 302
        authorize = start.headers["location"]
        assert authorize.startswith(f"{idp.issuer}/authorize?")
        assert "code_challenge_method=S256" in authorize and "nonce=" in authorize
        page = httpx.get(authorize)
        assert page.status_code == 200, page.text
        code = CODE.search(page.text)
        assert code is not None
        back = httpx.post(f"{idp.issuer}/approve", data={"code": code.group(1)})
        callback = back.headers["location"]
        assert callback.startswith("http://testserver/ui/oidc/callback?")
        # a forged state is refused before any token is asked for
        forged = app.get(re.sub(r"state=[^&]+", "state=forged", callback), follow_redirects=False)
        assert forged.status_code == 401
        done = app.get(callback.removeprefix("http://testserver"), follow_redirects=False)
        assert done.status_code == 303, done.text
        assert done.headers["location"] == "/ui/heatmap"
        assert app.get("/ui").status_code == 200
        assert "alice-0001 (operator)" in app.get("/ui/heatmap").text
        # the code is one use only: replaying the callback fails at the provider
        replay = app.get(callback.removeprefix("http://testserver"), follow_redirects=False)
        assert replay.status_code == 401


@pytest.mark.parametrize(
    ("roles", "why"),
    [
        ({"other-group": "admin"}, "no role is mapped"),
        ({OPERATORS: "client"}, "the client role has no console"),  # api.access: no /ui
    ],
    ids=["unmapped", "client"],
)
def test_an_account_with_no_mapped_role_is_refused(
    db_url: str,
    services_url: str,
    store: Store,
    idp: Provider,
    roles: dict[str, str],
    why: str,
) -> None:
    keys.create_key(engine=store.engine, name="someone", role=Role.READER)
    settings = oidc_settings(idp) | {"oidc_roles": roles}
    with api(db_url, services_url, **settings) as app:
        start = app.get("/ui/oidc/login", follow_redirects=False)
        code = CODE.search(httpx.get(start.headers["location"]).text)
        assert code is not None
        back = httpx.post(f"{idp.issuer}/approve", data={"code": code.group(1)})
        done = app.get(
            back.headers["location"].removeprefix("http://testserver"), follow_redirects=False
        )
        assert done.status_code == 403
        assert why in done.text
        assert "set-cookie" not in done.headers or "order_saga_session" not in str(
            done.headers.get("set-cookie")
        )


def test_sso_configured_turns_authentication_on_with_no_key_and_no_token(
    db_url: str, tmp_path: Path, idp: Provider
) -> None:
    """OpenID Connect set, no key ever made, no API_TOKEN: every path was open to anyone
    (the console, the API, the embedded services) while the login page offered a sign-in
    that guarded nothing. Configuring SSO now turns authentication on, fail closed."""
    settings = cli_settings(db_url, services_db=str(tmp_path / "s.db"), **oidc_settings(idp))
    with TestClient(create_app(settings, sweep=False)) as app:
        page = app.get("/ui", headers={"Accept": "text/html"}, follow_redirects=False)
        assert (page.status_code, page.headers.get("location")) == (303, "/ui/login?next=/ui")
        assert app.get("/orders").status_code == 401
        assert app.get(f"/services/users/{ORDINARY_USER_ID}").status_code == 401
        body = {"user_id": ORDINARY_USER_ID, "product_id": WIDGET_ID, "quantity": 1}
        assert app.post("/orders", json=body).status_code == 401
        assert app.get("/healthz").status_code == 200
        assert "single sign-on" in app.get("/ui/login").text


@pytest.mark.parametrize(
    "given",
    [
        {"ORDER_SAGA_OIDC_ISSUER": "https://login.example.com"},
        {"ORDER_SAGA_OIDC_CLIENT_ID": "order-saga", "ORDER_SAGA_OIDC_CLIENT_SECRET": "hunter2"},
    ],
    ids=["issuer-alone", "client-alone"],
)
def test_half_configured_sso_stops_the_command_in_one_line(given: dict[str, str]) -> None:
    """The issuer without the client id (or the reverse) started `serve` with single
    sign-on silently off; now it is refused at start naming both variables, exit 2, before
    the database is asked (the unreachable one would say so)."""
    unreachable = "postgresql+psycopg://postgres@127.0.0.1:1/nothing"
    result = run_cli("serve", ORDER_SAGA_DATABASE_URL=unreachable, **given)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("order-saga: invalid settings: "), line
    assert "ORDER_SAGA_OIDC_ISSUER" in line and "ORDER_SAGA_OIDC_CLIENT_ID" in line, line
    assert "hunter2" not in line


def _started(app: Any) -> tuple[str, str]:
    """A sign-in begun: (the callback's state, the code the provider would send back)."""
    start = app.get("/ui/oidc/login", follow_redirects=False)
    assert start.status_code == 302, start.text
    code = CODE.search(httpx.get(start.headers["location"]).text)
    assert code is not None
    state = re.search(r"[?&]state=([^&]+)", start.headers["location"])
    assert state is not None
    return state.group(1), code.group(1)


def test_a_bad_state_or_a_refused_code_is_a_401_not_a_500(
    db_url: str, services_url: str, store: Store, idp: Provider
) -> None:
    keys.create_key(engine=store.engine, name="someone", role=Role.READER)
    with api(db_url, services_url, **oidc_settings(idp)) as app:
        state, _code = _started(app)
        for forged in ("é", "ſtate", state[:-1] + "é"):  # not ASCII
            answer = app.get("/ui/oidc/callback", params={"code": "x", "state": forged})
            assert answer.status_code == 401, answer.text
            assert "state does not match" in answer.json()["detail"]
        # the state is right, the code is not one the provider gave (or it expired, or was
        # used): the provider answers invalid_grant
        refused = app.get("/ui/oidc/callback", params={"code": "bogus", "state": state})
        assert refused.status_code == 401, refused.text
        assert "refused the sign-in (invalid_grant): start again" in refused.json()["detail"]
        assert "order_saga_session" not in app.cookies


def test_an_unreachable_identity_provider_is_a_503_naming_it(
    db_url: str, services_url: str, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    keys.create_key(engine=store.engine, name="someone", role=Role.READER)
    gone = Provider(user=User("bob-0002", "bob@example.com", [OPERATORS]))
    with LiveServer(provider_app(gone)) as server:
        gone.issuer = server.url
        with api(db_url, services_url, **oidc_settings(gone)) as app:
            state, code = _started(app)  # discovery done, the flow cookie set
            server.stop()  # the provider goes away mid sign-in: its token endpoint
            answer = app.get("/ui/oidc/callback", params={"code": code, "state": state})
            assert answer.status_code == 503, answer.text
            assert answer.headers["retry-after"]
            assert f"identity provider {gone.issuer} cannot be reached" in answer.text
    # an issuer down from the start: a WARNING at start (the app starts all the same)
    settings = oidc_settings(gone) | {"oidc_issuer": f"http://127.0.0.1:{free_port()}"}
    with (
        caplog.at_level(logging.WARNING, logger="order_saga.api"),
        api(db_url, services_url, **settings) as app,
    ):
        wait_until(
            lambda: any(r.levelname == "WARNING" for r in caplog.records),
            what="the warning of the start's discovery",
        )
        assert "single sign-on: the identity provider" in caplog.text
        answer = app.get("/ui/oidc/login", follow_redirects=False)  # discovery
        assert answer.status_code == 503, answer.text
        problem = answer.json()
        assert problem["dependency"] == "identity provider"
        assert f"identity provider {settings['oidc_issuer']} cannot be reached" in problem["detail"]
        assert app.get("/ui/login").status_code == 200  # a key still signs in


WELL_KNOWN = "/.well-known/openid-configuration"


@pytest.mark.parametrize(
    ("issuer_path", "changes", "why"),
    [
        ("/realms/nope", {}, "HTTP 404 from"),  # the issuer's URL is not quite right
        ("", {"jwks_uri": "/jwks"}, "UnsupportedProtocol"),  # a URL httpx cannot use
        ("", {"token_endpoint": None}, "no token_endpoint in the discovery document"),
        ("", {"jwks_uri": "{issuer}" + WELL_KNOWN}, "KeyError"),  # JSON, but no key set
    ],
    ids=["no-discovery-at-the-issuer", "relative-jwks-uri", "no-token-endpoint", "no-key-set"],
)
def test_a_misconfigured_provider_is_a_500_logged_once_not_a_503(
    db_url: str,
    services_url: str,
    store: Store,
    caplog: pytest.LogCaptureFixture,
    issuer_path: str,
    changes: dict[str, Any],
    why: str,
) -> None:
    """A provider that answers, but not as configured, was a 503 "try again later":
    waiting never fixes it. Now a 500 saying single sign-on is misconfigured (no
    Retry-After), logged as an ERROR once (at start, not again on each sign-in)."""
    keys.create_key(engine=store.engine, name="someone", role=Role.READER)
    broken = Provider(user=User("bob-0002", "bob@example.com", [OPERATORS]))
    with LiveServer(provider_app(broken)) as server:
        broken.issuer = server.url + issuer_path
        broken.changes = {
            k: v.format(issuer=server.url) if isinstance(v, str) else v for k, v in changes.items()
        }
        with caplog.at_level(logging.WARNING, logger="order_saga.api"):
            with api(db_url, services_url, **oidc_settings(broken)) as app:
                for _ in range(2):
                    answer = app.get("/ui/oidc/login", follow_redirects=False)
                    assert answer.status_code == 500, answer.text
                    assert "retry-after" not in answer.headers
                    found = answer.json()
                    assert found["code"] == "sso_misconfigured"
                    assert found["detail"].startswith("single sign-on is misconfigured: ")
                    assert why in found["detail"], found["detail"]
                assert app.get("/ui/login").status_code == 200  # a key still signs in
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.levelname for r in errors] == ["ERROR"], caplog.text
    assert "single sign-on is misconfigured" in errors[0].getMessage()
    assert CLIENT_SECRET not in caplog.text


def test_a_provider_answering_5xx_is_a_503_with_retry_after(
    db_url: str, services_url: str, store: Store
) -> None:
    keys.create_key(engine=store.engine, name="someone", role=Role.READER)
    restarting = Provider(discovery_status=503)
    with LiveServer(provider_app(restarting)) as server:
        restarting.issuer = server.url
        with api(db_url, services_url, **oidc_settings(restarting)) as app:
            answer = app.get("/ui/oidc/login", follow_redirects=False)
            assert answer.status_code == 503, answer.text
            assert answer.headers["retry-after"]
            assert answer.json()["code"] == "identity_provider_unavailable"
            restarting.discovery_status = 200  # back: the next sign-in goes through
            assert app.get("/ui/oidc/login", follow_redirects=False).status_code == 302


# -- in the browser ----------------------------------------------------------------------


class Team:
    """A served `order-saga serve` with the bootstrap token, OIDC, and its database."""

    def __init__(self, served: Served, database_url: str) -> None:
        self.url = served.url
        self.database_url = database_url

    def place(self) -> dict[str, Any]:
        body = {"user_id": ORDINARY_USER_ID, "product_id": WIDGET_ID, "quantity": 1}
        auth = {"Authorization": f"Bearer {BOOTSTRAP}"}
        response = httpx.post(f"{self.url}/orders", json=body, headers=auth, timeout=30)
        assert response.status_code == 201, response.text
        return dict(response.json())

    def audit_rows(self, order_id: str) -> list[Any]:
        store = build_store(saga_settings(self.database_url))
        try:
            return [t for t in store.history(uuid.UUID(order_id)) if t.scope == AUDIT_SCOPE]
        finally:
            store.close()
            store.engine.dispose()


@pytest.fixture
def served(tmp_path: Path, idp: Provider) -> Iterator[Team]:
    url = f"sqlite:///{tmp_path}/saga.db"
    env = saga_env(
        database_url=url,
        services_db=str(tmp_path / "services.db"),
        api_token=BOOTSTRAP,
        oidc_issuer=idp.issuer,
        oidc_client_id=CLIENT_ID,
        oidc_client_secret=CLIENT_SECRET,
        oidc_roles=json.dumps({OPERATORS: "operator"}),
    )
    server = Served(env).wait_ready()
    try:
        yield Team(server, url)
    finally:
        output = server.stop()
        assert BOOTSTRAP not in output and CLIENT_SECRET not in output


@pytest.fixture
def page(served: Team) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        tab = browser.new_page(viewport={"width": 1280, "height": 900})
        tab.set_default_timeout(30_000)
        try:
            yield tab
        finally:
            browser.close()


def _cancel_in_the_browser(page: Any, served: Team, order_id: str) -> None:
    from playwright.sync_api import expect

    page.goto(f"{served.url}/ui/orders/{order_id}")
    page.get_by_role("link", name="Cancel order").click()
    page.get_by_label("Why").fill("customer called")
    page.get_by_role("button", name="Yes, cancel order").click()
    expect(page.get_by_role("status")).to_contain_text("now cancelled")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason="no chromium")
def test_the_browser_signs_in_with_a_key_then_with_oidc_and_acts(
    served: Team, page: Any, idp: Provider
) -> None:
    from playwright.sync_api import expect

    engine = make_engine(served.database_url)
    secret = keys.create_key(engine=engine, name="ops-bob", role=Role.OPERATOR)
    engine.dispose()

    # with a key
    first = served.place()
    page.goto(f"{served.url}/ui")
    expect(page).to_have_url(re.compile(r"/ui/login\?next=/ui$"))
    page.get_by_label("API key").fill(secret)
    page.get_by_role("button", name="Sign in with a key").click()
    expect(page.locator(".whoami")).to_contain_text("ops-bob (operator)")
    _cancel_in_the_browser(page, served, first["id"])
    (row,) = served.audit_rows(first["id"])
    assert row.detail["by"] == "ops-bob" and row.detail["channel"] == "console"
    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(re.compile(r"/ui/login$"))

    # with OpenID Connect
    second = served.place()
    page.goto(f"{served.url}/ui")
    page.get_by_role("link", name="Sign in with single sign-on").click()
    page.get_by_role("button", name="Continue as alice@example.com").click()
    expect(page.locator(".whoami")).to_contain_text("alice-0001 (operator)")
    _cancel_in_the_browser(page, served, second["id"])
    (row,) = served.audit_rows(second["id"])
    assert row.detail is not None
    assert (row.detail["by"], row.detail["email"], row.detail["via"]) == (
        "alice-0001",
        "alice@example.com",
        "oidc",
    )


def _signed_in_with_oidc(app: Any, idp: Provider) -> str:
    """Sign `app`'s client in through `idp`; the session's CSRF token."""
    start = app.get("/ui/oidc/login", follow_redirects=False)
    code = CODE.search(httpx.get(start.headers["location"]).text)
    assert code is not None
    back = httpx.post(f"{idp.issuer}/approve", data={"code": code.group(1)})
    done = app.get(
        back.headers["location"].removeprefix("http://testserver"), follow_redirects=False
    )
    assert done.status_code == 303, done.text
    csrf = re.search(r'name="csrf" value="([^"]+)"', app.get("/ui").text)
    assert csrf is not None
    return csrf.group(1)


@pytest.mark.parametrize(
    "subject", ["shop", "s" * 200], ids=["a-client-key's-name", "longer-than-the-column"]
)
def test_an_oidc_user_owns_orders_apart_from_a_key_of_the_same_name(
    db_url: str, services_url: str, store: Store, subject: str
) -> None:
    """An OIDC subject and a key name are two namespaces: the orders and idempotency keys
    of the OIDC user `shop` are not the client key `shop`'s (before, both were the bare
    name, so that key saw, replayed and cancelled them). A subject of any length fits."""
    secret = keys.create_key(engine=store.engine, name="shop", role=Role.CLIENT)
    client = {"Authorization": f"Bearer {secret}"}
    provider = Provider(user=User(subject, "op@example.com", [OPERATORS]))
    body = {"user_id": ORDINARY_USER_ID, "product_id": WIDGET_ID, "quantity": 1}
    with LiveServer(provider_app(provider)) as server:
        provider.issuer = server.url
        with api(db_url, services_url, **oidc_settings(provider)) as app:
            csrf = _signed_in_with_oidc(app, provider)
            mine = {"X-CSRF-Token": csrf, "Idempotency-Key": "op-1"}
            placed = app.post("/orders", json=body, headers=mine)
            assert placed.status_code == 201, placed.text
            oid = placed.json()["id"]
            again = app.post("/orders", json=body, headers=mine)  # the user's own retry
            assert again.json()["id"] == oid
            app.cookies.clear()
            assert app.get(f"/orders/{oid}", headers=client).status_code == 404
            assert app.get("/orders", headers=client).json()["orders"] == []
            replay = app.post("/orders", json=body, headers=client | {"Idempotency-Key": "op-1"})
            assert replay.status_code == 201 and replay.json()["id"] != oid
            assert app.post(f"/orders/{oid}/cancel", headers=client).status_code == 404
    assert store.get(uuid.UUID(oid)).created_by == keys.oidc_owner(subject)
    assert len(keys.oidc_owner(subject)) <= 64 and keys.oidc_owner(subject).startswith("oidc:")


def test_signing_out_ends_an_oidc_session_on_the_server(
    db_url: str, services_url: str, store: Store, idp: Provider
) -> None:
    """An OIDC session has no key to revoke: signing out is what ends it, for a copy of
    its cookie too (before, the copy worked until SESSION_SECONDS)."""
    keys.create_key(engine=store.engine, name="someone", role=Role.READER)  # auth is on
    with api(db_url, services_url, **oidc_settings(idp)) as app:
        csrf = _signed_in_with_oidc(app, idp)
        copied = app.cookies["order_saga_session"]
        out = app.post("/ui/logout", data={"csrf": csrf}, follow_redirects=False)
        assert out.status_code == 303
        app.cookies.set("order_saga_session", copied)
        assert app.get("/ui").status_code == 401
        assert app.get("/orders").status_code == 401
