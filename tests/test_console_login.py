"""Issue 17, item 3: the console signs in with a key. A signed HttpOnly SameSite=Lax
cookie with an expiry, CSRF on every form, role-aware pages, logout; /docs and /redoc
work once signed in. (OIDC: tests/test_oidc.py.)"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from api.session import COOKIE
from downstream.seed import ORDINARY_USER_ID, SOLD_OUT_PRODUCT_ID
from fsm import keys
from fsm.machine import AUDIT_SCOPE
from fsm.roles import Role
from fsm.store import Store
from tests.support.api import LOGIN_TOKEN, api, console_sign_in, place
from tests.support.waiting import wait_until

HTML = {"Accept": "text/html"}
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@pytest.fixture
def team(store: Store) -> dict[str, str]:
    made = {"shop": Role.CLIENT, "auditor": Role.READER, "ops-alice": Role.OPERATOR}
    return {n: keys.create_key(engine=store.engine, name=n, role=r) for n, r in made.items()}


@pytest.fixture
def console(db_url: str, services_url: str, team: dict[str, str]) -> Iterator[TestClient]:
    with api(db_url, services_url, cookie_secure=False) as c:
        yield c


def sign_in(client: TestClient, secret: str, next_: str = "/ui") -> None:
    answer = console_sign_in(client, secret, next_)
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"] == next_


def test_a_browser_without_a_session_is_sent_to_the_login_page(console: TestClient) -> None:
    page = console.get("/ui", headers=HTML, follow_redirects=False)
    assert (page.status_code, page.headers["location"]) == (303, "/ui/login?next=/ui")
    assert console.get("/ui").status_code == 401  # an API client is told, not redirected
    assert console.get("/ui/login").status_code == 200
    wrong = console_sign_in(console, "osk_nope")
    assert wrong.status_code == 401 and COOKIE not in wrong.cookies
    # never an open redirect off the site
    sign_in_elsewhere = console.get("/ui/login?next=//evil.example/x")
    assert "//evil.example" not in sign_in_elsewhere.text


def test_the_login_page_gets_its_stylesheet_and_script_before_signing_in(
    console: TestClient,
) -> None:
    """Once authentication was on, /ui/static answered 401 to a browser not signed in, so
    the sign-in page itself was unstyled. The console's own assets hold no data: public."""
    login = console.get("/ui/login")
    assert 'href="/ui/static/ui.css"' in login.text and 'src="/ui/static/ui.js"' in login.text
    for asset, kind in (("ui.css", "text/css"), ("ui.js", "javascript")):
        answer = console.get(f"/ui/static/{asset}", headers={"Accept": "*/*"})
        assert answer.status_code == 200, (asset, answer.status_code)
        assert kind in answer.headers["content-type"]
    assert console.get("/ui/static/nothing.css").status_code == 404


def test_the_login_page_sends_the_browser_back_with_its_query_string(
    console: TestClient, team: dict[str, str]
) -> None:
    """A deep link (a filtered list) opened without a session comes back whole after the
    sign-in; before, /ui?status=needs_attention came back as /ui."""
    deep = "/ui?status=needs_attention&limit=5"
    page = console.get(deep, headers=HTML, follow_redirects=False)
    assert page.status_code == 303
    login = page.headers["location"]
    assert login == "/ui/login?next=/ui%3Fstatus%3Dneeds_attention%26limit%3D5"
    form = console.get(login)
    assert 'name="next" value="/ui?status=needs_attention&amp;limit=5"' in form.text
    sign_in(console, team["auditor"], deep)
    # still never off the site: the target is this site's path, whatever the query holds
    console.cookies.clear()
    odd = console.get("/ui?next=//evil.example", headers=HTML, follow_redirects=False)
    assert odd.headers["location"].startswith("/ui/login?next=/ui%3F")
    assert "//evil.example" not in console.get("/ui/login?next=//evil.example").text


def _token(client: TestClient) -> str:
    """GET the sign-in form (setting its cookie in `client`): the token in its field."""
    found = LOGIN_TOKEN.search(client.get("/ui/login").text)
    return found.group(1) if found else ""


@pytest.mark.parametrize(
    "forged",
    ["no-cookie-no-field", "no-cookie", "no-field", "mismatch", "another-browsers"],
)
def test_a_sign_in_not_posted_by_this_sites_form_is_refused(
    db_url: str, services_url: str, team: dict[str, str], forged: str
) -> None:
    """Login CSRF: another site's form, posted with the attacker's key, would sign the
    victim's browser in as the attacker (what they then do and type, his to see). The
    form must carry the token this site set, with the form, in this browser's cookie: a
    page elsewhere can read neither."""
    with (
        api(db_url, services_url, cookie_secure=False) as victim,
        api(db_url, services_url, cookie_secure=False) as attacker,
    ):
        form = {"key": team["auditor"], "next": "/ui"}
        if forged == "no-cookie":
            form["login_token"] = _token(attacker)  # a real token, of another browser
        elif forged == "no-field":
            _token(victim)
        elif forged == "mismatch":
            _token(victim)
            form["login_token"] = "x" * 43
        elif forged == "another-browsers":
            _token(victim)
            form["login_token"] = _token(attacker)
        refused = victim.post("/ui/login", data=form, follow_redirects=False)
        assert refused.status_code == 403, refused.text
        assert "sent from another site" in refused.text
        assert COOKIE not in refused.cookies and COOKIE not in victim.cookies
        assert victim.get("/ui", headers=HTML, follow_redirects=False).status_code == 303


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://testserver"},
        # behind nginx's default proxy_set_header Host $proxy_host: the app is sent
        # Host 127.0.0.1:8000 while the browser's Origin names the public site
        {"Origin": "https://saga.example.com", "Host": "127.0.0.1:8000"},
        {"Referer": "https://saga.example.com/ui/login", "Host": "127.0.0.1:8000"},
        {},  # not a browser: a script that GETs the form first
    ],
    ids=["origin", "proxy-rewrites-host", "proxy-referer", "none"],
)
def test_a_sign_in_from_this_sites_form_is_accepted_whatever_the_host(
    console: TestClient, team: dict[str, str], headers: dict[str, str]
) -> None:
    """Before, the Origin was compared with the Host header, and a proxy that rewrites Host
    (nginx's default) had every browser sign-in refused with a 403."""
    form = {"key": team["auditor"], "next": "/ui", "login_token": _token(console)}
    answer = console.post("/ui/login", data=form, headers=headers, follow_redirects=False)
    assert (answer.status_code, answer.headers["location"]) == (303, "/ui"), answer.text
    assert COOKIE in answer.cookies
    assert console.get("/ui").status_code == 200


def test_the_login_forms_cookie_is_httponly_lax_and_secure_like_the_session(
    db_url: str, services_url: str
) -> None:
    with api(db_url, services_url) as client:  # testserver is not localhost: Secure
        cookie = client.get("/ui/login").headers["set-cookie"]
    assert cookie.startswith("__Host-order_saga_login=")
    for attribute in ("HttpOnly", "SameSite=lax", "Secure", "Path=/"):
        assert attribute.lower() in cookie.lower(), cookie
    with api(db_url, services_url, cookie_secure=False) as local:
        assert "secure" not in local.get("/ui/login").headers["set-cookie"].lower()


def test_the_session_cookie_is_signed_httponly_lax_and_expires(
    db_url: str, services_url: str, team: dict[str, str]
) -> None:
    with api(db_url, services_url) as client:  # testserver is not localhost: Secure
        client.base_url = client.base_url.copy_with(scheme="https")  # to send its cookie back
        answer = console_sign_in(client, team["auditor"])
    cookie = next(c for c in answer.headers.get_list("set-cookie") if COOKIE in c)
    assert cookie.startswith(f"__Host-{COOKIE}=")
    for attribute in ("HttpOnly", "SameSite=lax", "Secure", "Max-Age=28800", "Path=/"):
        assert attribute.lower() in cookie.lower(), cookie
    assert team["auditor"] not in cookie


def test_a_reader_sees_no_buttons_and_may_not_act(
    console: TestClient, team: dict[str, str], store: Store
) -> None:
    oid = place(console, headers={"Authorization": f"Bearer {team['shop']}"}).json()["id"]
    sign_in(console, team["auditor"])
    page = console.get(f"/ui/orders/{oid}")
    assert page.status_code == 200 and "auditor (reader)" in page.text
    assert "action-cancel" not in page.text  # a completed order, but not for a reader
    csrf = CSRF.search(page.text)
    assert csrf is not None  # the sign-out form
    refused = console.post(f"/ui/orders/{oid}/cancel", data={"csrf": csrf.group(1)})
    assert refused.status_code == 403
    assert console.get(f"/ui/orders/{oid}/cancel").status_code == 403
    for path in ("/docs", "/redoc", "/openapi.json", "/ui/heatmap"):
        assert console.get(path).status_code == 200, path
    assert store.get(uuid.UUID(oid)).status == "completed"


def test_an_operator_acts_with_the_csrf_token_and_is_named_in_the_log(
    console: TestClient, team: dict[str, str], store: Store
) -> None:
    stuck, _ = asyncio.run(
        store.create_order(user_id=ORDINARY_USER_ID, product_id=SOLD_OUT_PRODUCT_ID, quantity=1)
    )
    sign_in(console, team["ops-alice"], f"/ui/orders/{stuck.id}")
    confirm = console.get(f"/ui/orders/{stuck.id}/resume")
    assert confirm.status_code == 200
    token = CSRF.search(confirm.text)
    assert token is not None
    path = f"/ui/orders/{stuck.id}/resume"
    for forged in ({}, {"csrf": "not-it"}):
        refused = console.post(path, data=forged, follow_redirects=False)
        assert refused.status_code == 403, refused.text
    assert [t for t in store.history(stuck.id) if t.scope == AUDIT_SCOPE] == []
    # the API with only the cookie: a state change needs the X-CSRF-Token header too
    assert console.post(f"/orders/{stuck.id}/resume").status_code == 401
    done = console.post(
        path, data={"csrf": token.group(1), "reason": "INC-9"}, follow_redirects=False
    )
    assert done.status_code == 303, done.text
    (row,) = [t for t in store.history(stuck.id) if t.scope == AUDIT_SCOPE]
    assert row.detail is not None
    assert (row.detail["by"], row.detail["as"], row.detail["channel"], row.detail["reason"]) == (
        "ops-alice",
        "operator",
        "console",
        "INC-9",
    )
    # logout needs the token too, then the session is gone
    assert console.post("/ui/logout", follow_redirects=False).status_code == 403
    out = console.post("/ui/logout", data={"csrf": token.group(1)}, follow_redirects=False)
    assert out.status_code == 303
    assert console.get("/ui", headers=HTML, follow_redirects=False).status_code == 303


def test_signing_out_ends_the_session_on_the_server_for_every_copy_of_the_cookie(
    db_url: str, services_url: str, team: dict[str, str]
) -> None:
    """Sign out, and a copy of the cookie taken before (another tab, a stolen one) opens
    nothing: at once in the process that signed out, within the 5 s a revocation takes in
    another `serve` process. Before, sign-out only cleared the browser's cookie and a copy
    worked for SESSION_SECONDS (8 h)."""
    with (
        api(db_url, services_url, cookie_secure=False) as here,
        api(db_url, services_url, cookie_secure=False) as elsewhere,
    ):
        sign_in(here, team["ops-alice"])
        copied = here.cookies["order_saga_session"]
        elsewhere.cookies.set("order_saga_session", copied)
        assert elsewhere.get("/ui").status_code == 200  # its process has it cached now
        page = here.get("/ui")
        csrf = CSRF.search(page.text)
        assert csrf is not None
        out = here.post("/ui/logout", data={"csrf": csrf.group(1)}, follow_redirects=False)
        assert out.status_code == 303
        here.cookies.set("order_saga_session", copied)  # the copy, in this process
        assert here.get("/ui").status_code == 401
        assert here.get("/ui", headers=HTML, follow_redirects=False).status_code == 303
        wait_until(
            lambda: elsewhere.get("/ui").status_code == 401,
            timeout=5.0,  # the bound a revoked key has, too
            what="the signed-out session to end in the other process",
        )
        # and the API with it: no GET, no action with its CSRF header
        header = {"X-CSRF-Token": csrf.group(1)}
        assert elsewhere.get("/orders").status_code == 401
        assert elsewhere.post("/orders", json={}, headers=header).status_code == 401
        # a new sign-in is a new session (the browser then holds that cookie alone)
        elsewhere.cookies.delete("order_saga_session")
        sign_in(elsewhere, team["ops-alice"])
        assert elsewhere.get("/ui").status_code == 200


def test_revoking_the_key_ends_its_sessions(
    console: TestClient, team: dict[str, str], store: Store
) -> None:
    sign_in(console, team["auditor"])
    assert console.get("/ui").status_code == 200
    keys.revoke_key(engine=store.engine, name="auditor")
    wait_until(
        lambda: console.get("/ui").status_code == 401,
        timeout=5.0,  # the contract: a revoked key stops working within 5 s
        what="the revoked key's session to end",
    )


def test_an_altered_cookie_is_no_session(console: TestClient, team: dict[str, str]) -> None:
    sign_in(console, team["auditor"])
    good = console.cookies["order_saga_session"]
    console.cookies.clear()
    forged = good[:-3] + ("AAA" if not good.endswith("AAA") else "BBB")
    console.cookies.set("order_saga_session", forged)
    assert console.get("/ui").status_code == 401


def _cookie_signed_ago(store: Store, seconds: float, **data: object) -> str:
    """A session cookie as the console signs it, but issued `seconds` ago (the signature
    carries the time): made with the deployment's own session secret, as a server would."""
    from itsdangerous import TimestampSigner, URLSafeTimedSerializer

    class Earlier(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time() - seconds)

    secret = keys.server_secret(engine=store.engine, name="session")
    signer = URLSafeTimedSerializer(secret, salt="order-saga console session", signer=Earlier)
    return signer.dumps({"c": "x" * 32, "s": "s" * 32, "e": None, "b": None, **data})


def test_a_cookie_from_before_sessions_had_an_id_is_no_session(
    console: TestClient, team: dict[str, str], store: Store
) -> None:
    """A cookie signed before sign-out ended sessions on the server has no session id: it
    could never be ended, so it opens nothing (sign in once again)."""
    from itsdangerous import URLSafeTimedSerializer

    secret = keys.server_secret(engine=store.engine, name="session")
    signer = URLSafeTimedSerializer(secret, salt="order-saga console session")
    reader = {"n": "auditor", "r": "reader", "k": "key", "c": "x" * 32, "e": None, "b": None}
    console.cookies.set("order_saga_session", signer.dumps(reader))
    assert console.get("/ui").status_code == 401
    console.cookies.set("order_saga_session", signer.dumps(reader | {"s": "s" * 32}))
    assert console.get("/ui").status_code == 200


def test_the_session_lasts_session_seconds_on_the_server_too(
    db_url: str, services_url: str, team: dict[str, str], store: Store
) -> None:
    """SESSION_SECONDS bounds the session where it counts, on the server: a cookie kept
    past its Max-Age (copied, stolen) opens nothing."""
    reader = {"n": "auditor", "r": "reader", "k": "key"}
    with api(db_url, services_url, cookie_secure=False, session_seconds=60) as client:
        client.cookies.set("order_saga_session", _cookie_signed_ago(store, 30, **reader))
        assert client.get("/ui").status_code == 200
        client.cookies.set("order_saga_session", _cookie_signed_ago(store, 120, **reader))
        assert client.get("/ui").status_code == 401


def test_a_token_session_ends_when_the_token_changes(db_url: str, services_url: str) -> None:
    with api(db_url, services_url, cookie_secure=False, api_token="first-token") as first:
        sign_in(first, "first-token")
        assert "api-token (admin)" in first.get("/ui").text
        cookie = first.cookies["order_saga_session"]
    with api(db_url, services_url, cookie_secure=False, api_token="first-token") as same:
        same.cookies.set("order_saga_session", cookie)  # another process, the same token
        assert same.get("/ui").status_code == 200
    with api(db_url, services_url, cookie_secure=False, api_token="second-token") as rotated:
        rotated.cookies.set("order_saga_session", cookie)
        assert rotated.get("/ui").status_code == 401


def test_a_console_message_shows_only_in_the_session_that_acted(
    db_url: str, services_url: str, team: dict[str, str]
) -> None:
    """A signed outcome message was bound to the page but not to who acted: an operator
    could post a crafted event to /ui/events/redeliver and send the resulting link to
    another user, whose console showed the text as its own alert for 5 minutes."""
    bait = "Your session expired. Sign in again at https://evil.example/login"
    with (
        api(db_url, services_url, cookie_secure=False) as mallory,
        api(db_url, services_url, cookie_secure=False) as victim,
    ):
        sign_in(mallory, team["ops-alice"], "/ui/events")
        token = CSRF.search(mallory.get("/ui/events").text)
        assert token is not None
        sent = {"csrf": token.group(1), "event": bait}
        back = mallory.post("/ui/events/redeliver", data=sent, follow_redirects=False)
        assert back.status_code == 303, back.text
        link = back.headers["location"]
        assert "evil.example" in mallory.get(link).text  # the session that acted: shown
        sign_in(victim, team["auditor"], "/ui/events")
        page = victim.get(link)
        assert page.status_code == 200, page.text
        assert "evil.example" not in page.text and 'class="flash' not in page.text


@pytest.mark.parametrize(
    ("origin", "secure"),
    [("https://saga.example.com", True), ("http://127.0.0.1:8000", False)],
    ids=["browser-on-https", "browser-on-local-http"],
)
def test_behind_a_proxy_the_session_cookie_is_secure_when_the_browser_is_on_https(
    db_url: str, services_url: str, team: dict[str, str], origin: str, secure: bool
) -> None:
    """A proxy that ends TLS and rewrites Host (nginx's default) makes the request look
    like plain http to 127.0.0.1: the browser's Origin says where it really is, and its
    session cookie must then never travel over plain http. Before, it had no Secure."""
    with api(db_url, services_url) as client:  # COOKIE_SECURE unset: decided per request
        client.base_url = client.base_url.copy_with(scheme="http", host="127.0.0.1", port=8000)
        form = {"key": team["auditor"], "next": "/ui", "login_token": _token(client)}
        answer = client.post(
            "/ui/login", data=form, headers={"Origin": origin}, follow_redirects=False
        )
    assert answer.status_code == 303, answer.text
    cookie = next(c for c in answer.headers.get_list("set-cookie") if c.startswith(COOKIE))
    assert ("secure" in cookie.lower()) is secure, cookie


def _signed_in_cookie(client: TestClient, secret: str) -> str:
    """Sign `client` in with `secret`: the session cookie's value (then cleared)."""
    answer = console_sign_in(client, secret)
    assert answer.status_code == 303, answer.text
    (value,) = [v for k, v in answer.cookies.items() if k.endswith(COOKIE)]
    client.cookies.clear()
    return value


def test_on_https_the_cookies_are_host_only_and_a_planted_one_is_not_read(
    db_url: str, services_url: str, team: dict[str, str]
) -> None:
    """A sibling subdomain (Domain=example.com) or a man in the middle on plain http could
    plant `order_saga_login` / `order_saga_session`: a login token the attacker knows signs
    the victim in as the attacker's key (login CSRF). On https the cookies are `__Host-`
    ones, which a browser accepts only from this very host over https, and only those are
    read. Before, the bare names were set and read there."""
    with api(db_url, services_url) as client:
        client.base_url = client.base_url.copy_with(scheme="https", host="console.example.com")
        form = client.get("/ui/login").headers.get_list("set-cookie")
        assert [c.split("=")[0] for c in form] == ["__Host-order_saga_login"], form
        assert "domain=" not in form[0].lower()
        client.cookies.clear()
        planted = "A" * 43
        refused = client.post(
            "/ui/login",
            data={"key": team["ops-alice"], "next": "/ui", "login_token": planted},
            headers={"Cookie": f"order_saga_login={planted}"},
            follow_redirects=False,
        )
        assert refused.status_code == 403, refused.text
        assert not [c for c in refused.headers.get_list("set-cookie") if COOKIE in c]
        mallory = _signed_in_cookie(client, team["auditor"])
        bare = client.get("/ui", headers={"Cookie": f"{COOKIE}={mallory}", **HTML})
        assert bare.status_code == 200 and "Sign in" in bare.text  # the login page
        own = client.get("/ui", headers={"Cookie": f"__Host-{COOKIE}={mallory}"})
        assert own.status_code == 200 and "auditor" in own.text


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_session_cookie_sent_twice_is_no_session(
    db_url: str, services_url: str, team: dict[str, str], scheme: str
) -> None:
    """A planted session cookie next to the victim's own (another path or domain): the
    browser sends both and Starlette keeps the last, so the victim's console actions were
    audited as the attacker. Which one is this site's cannot be told: neither is read."""
    secure = scheme == "https"
    with api(db_url, services_url, cookie_secure=secure) as client:
        client.base_url = client.base_url.copy_with(scheme=scheme)
        alice = _signed_in_cookie(client, team["ops-alice"])
        mallory = _signed_in_cookie(client, team["auditor"])
        name = f"__Host-{COOKIE}" if secure else COOKIE
        both = {"Cookie": f"{name}={alice}; {name}={mallory}"}
        assert client.get("/ui", headers=both).status_code == 401
        page = client.get("/ui", headers={**both, **HTML}, follow_redirects=False)
        assert (page.status_code, page.headers["location"]) == (303, "/ui/login?next=/ui")
        split = {"Cookie": f"{name}={alice}", "cookie": f"{name}={mallory}"}
        assert client.get("/ui", headers=split).status_code == 401
        assert client.get("/ui", headers={"Cookie": f"{name}={alice}"}).status_code == 200
