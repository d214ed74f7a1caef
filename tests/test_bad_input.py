"""Bad input anywhere is a clear 4xx problem and creates nothing (issue 11, items 6-8, 11,
16): non-finite and overflowing numbers, lone surrogates, duplicate keys, invalid UTF-8,
deep nesting, oversized bodies, blank Idempotency-Keys, 64-bit overflows at the services,
loose /_faults bodies. Answers echo at most a short excerpt of what was sent."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlmodel import SQLModel

from api.app import create_app
from api.guard import BodyGuard
from downstream.app import create_services_app
from downstream.faults import MAX_PENDING
from downstream.seed import ORDINARY_USER_ID, WIDGET_ID
from fsm import subscriptions
from fsm.store import make_engine
from tests.support.services import LiveServer
from tests.support.settings import cli_settings

PROBLEM = "application/problem+json"
SMALL = 2048  # bytes: an error answer never echoes a body back
CAP = 64 * 1024
OK = f'"user_id": {ORDINARY_USER_ID}, "product_id": {WIDGET_ID}, "quantity": 1'


def order(**fields: str) -> str:
    """An order body with some fields replaced by raw JSON text."""
    values = {"user_id": str(ORDINARY_USER_ID), "product_id": str(WIDGET_ID), "quantity": "1"}
    values |= fields
    return "{" + ", ".join(f'"{k}": {v}' for k, v in values.items()) + "}"


BAD_ORDERS: list[Any] = [
    *(
        pytest.param(order(**{field: value}), 422, id=f"{field}={value}")
        for field in ("user_id", "product_id", "quantity")
        for value in ("NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1.5", "true", '"1"')
    ),
    pytest.param(order(user_id=str(2**64)), 422, id="user_id beyond 64 bits"),
    pytest.param(order(user_id="9" * 5000), 422, id="5000-digit integer"),
    pytest.param(order(quantity='"\\ud800"'), 422, id="lone high surrogate"),
    pytest.param(order(quantity='"\\udfff"'), 422, id="lone low surrogate"),
    pytest.param("{" + OK + ', "\\ud800": 1}', 422, id="lone surrogate in a key"),
    pytest.param('{"user_id": 1, "user_id": 2, "product_id": 1, "quantity": 1}', 422, id="dup"),
    pytest.param('{"a": {"b": 1, "b": 1}, ' + OK + "}", 422, id="nested duplicate key"),
    pytest.param(b'{"user_id": "\xff\xfe", "product_id": 1, "quantity": 1}', 422, id="not UTF-8"),
    pytest.param("[" * 20_000 + "]" * 20_000, 422, id="nested 20000 deep"),
    pytest.param("[" + "1," * 30_000 + "1]", 422, id="60 KiB array"),
    pytest.param("[" + "1," * (CAP // 2) + "1]", 413, id="body over 64 KiB"),
    pytest.param('{"user_id": 1 "product_id": 1}', 422, id="syntax error"),
]


def assert_problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text[:300]
    assert response.headers["content-type"] == PROBLEM
    assert len(response.content) < SMALL, len(response.content)
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["title"] and body["detail"]
    return body


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, services_server: LiveServer) -> Iterator[Any]:
    url = f"sqlite:///{tmp_path_factory.mktemp('bad')}/saga.db"
    engine = make_engine(url)
    SQLModel.metadata.create_all(engine)
    engine.dispose()
    settings = cli_settings(url, services_server.url)
    with TestClient(create_app(settings, sweep=False)) as client:
        yield client


@pytest.fixture
def nothing_created(api: TestClient, services_server: LiveServer) -> Iterator[None]:
    effects = httpx.get(f"{services_server.url}/_effects").json()
    yield
    assert api.get("/orders").json()["orders"] == []
    assert httpx.get(f"{services_server.url}/_effects").json() == effects


@pytest.mark.usefixtures("nothing_created")
@pytest.mark.parametrize(("content", "status"), BAD_ORDERS)
def test_bad_order_body(api: TestClient, content: str | bytes, status: int) -> None:
    response = api.post("/orders", content=content, headers={"Content-Type": "application/json"})
    assert_problem(response, status)


@pytest.mark.usefixtures("nothing_created")
@pytest.mark.parametrize(
    "content_type",
    [
        "application/json; charset=latin-1",
        "application/json;charset=ISO-8859-1",
        'application/json; charset="utf-16"',
        "application/problem+json; charset=windows-1252",
    ],
)
def test_a_body_declared_in_another_charset_is_415(api: TestClient, content_type: str) -> None:
    """JSON is UTF-8 (RFC 8259 §8.1): a body declared otherwise would be misread as UTF-8."""
    body = ("{" + OK + "}").encode("latin-1")
    response = api.post("/orders", content=body, headers={"Content-Type": content_type})
    problem = assert_problem(response, 415)
    assert problem["code"] == "unsupported_charset"
    assert "UTF-8" in problem["detail"] and "charset=" in problem["detail"]


@pytest.mark.usefixtures("nothing_created")
@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/orders", "application/x-www-form-urlencoded"),  # plain `curl -d`
        ("/orders", None),  # FastAPI reads such a body as bytes, not JSON
        ("/orders", "text/plain"),
        ("/orders", "text/plain; charset=utf-8"),
        ("/orders", "multipart/form-data; boundary=x"),
        (f"/orders/{'0' * 8}-0000-0000-0000-{'0' * 12}/resolve", "text/plain"),
        ("/services/_faults", "application/x-www-form-urlencoded"),
    ],
)
def test_a_body_not_declared_json_is_415(
    api: TestClient, path: str, content_type: str | None
) -> None:
    """Not a 422 "Input should be a valid dictionary" echoing the bytes: the answer says
    what to send."""
    body = ("{" + OK + "}").encode()
    headers = {"Content-Type": content_type} if content_type else {}
    request = api.build_request("POST", path, content=body, headers=headers)
    assert request.headers.get("Content-Type") == content_type
    response = api.send(request)
    problem = assert_problem(response, 415)
    assert problem["code"] == "unsupported_media_type"
    assert "Content-Type: application/json" in problem["detail"]
    assert "b'" not in response.text


@pytest.mark.usefixtures("nothing_created")
@pytest.mark.parametrize(
    "content_type",
    ["application/json", "APPLICATION/JSON", "application/json; charset=utf-8"],
)
def test_a_body_declared_json_is_read(api: TestClient, content_type: str) -> None:
    """The schema's 422 below, not a 415."""
    content = order(quantity="0").encode()
    response = api.post("/orders", content=content, headers={"Content-Type": content_type})
    body = assert_problem(response, 422)
    assert body["code"] == "invalid_request" and body["errors"][0]["loc"] == ["body", "quantity"]


@pytest.mark.parametrize("action", ["cancel", "resume"])
def test_a_body_sent_to_a_route_that_takes_none_is_ignored_not_415(
    api: TestClient, action: str
) -> None:
    """`curl -X POST …/cancel -d 'reason=…'`: the route takes no body (its reason is a query
    parameter), so the body is ignored as it always was; a 415 asking for JSON would send
    the caller to a JSON body that is ignored too. (An unknown order: its 404.)"""
    response = api.post(
        f"/orders/{uuid.uuid4()}/{action}",
        content=b"reason=customer asked",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert assert_problem(response, 404)["code"] == "order_not_found"


def test_the_console_forms_are_not_held_to_json(api: TestClient) -> None:
    """The console posts HTML forms under /ui/: the guard lets them through (here to the
    login form, which answers for itself)."""
    response = api.post(
        "/ui/login",
        content=b"key=nope&next=%2Fui&login_token=x",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code != 415, response.text


@pytest.mark.usefixtures("nothing_created")
@pytest.mark.parametrize("charset", ["utf-8", "UTF-8", "utf8", '"utf-8"'])
def test_a_body_declared_utf8_is_read_as_utf8(api: TestClient, charset: str) -> None:
    headers = {"Content-Type": f"application/json; charset={charset}"}
    content = order(user_id='"café"').encode("utf-8")  # reaches validation, decoded
    body = assert_problem(api.post("/orders", content=content, headers=headers), 422)
    assert body["code"] == "invalid_request" and body["errors"][0]["input"] == "café"


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("/orders", {"GET", "HEAD", "POST"}),
        (f"/orders/{'0' * 8}-0000-0000-0000-{'0' * 12}", {"GET", "HEAD"}),
        (f"/orders/{'0' * 8}-0000-0000-0000-{'0' * 12}/resume", {"POST"}),
        ("/healthz", {"GET", "HEAD"}),
    ],
)
def test_405_allows_every_method_of_the_path(api: TestClient, path: str, allowed: set[str]) -> None:
    response = api.options(path)
    assert_problem(response, 405)
    assert set(response.headers["Allow"].replace(" ", "").split(",")) == allowed


@pytest.mark.usefixtures("nothing_created")
def test_oversized_body_without_content_length_is_413(api: TestClient) -> None:
    def chunks() -> Iterator[bytes]:  # chunked transfer: no Content-Length to trust
        yield b"["
        for _ in range(CAP // 1000 + 1):
            yield b"1," * 500
        yield b"1]"

    response = api.post("/orders", content=chunks(), headers={"Content-Type": "application/json"})
    assert_problem(response, 413)


@pytest.mark.usefixtures("nothing_created")
@pytest.mark.parametrize(
    "key", ["", " ", "   ", "\t", " padded", "padded ", "k" * 201, "clé"], ids=repr
)
def test_blank_or_bad_idempotency_key_is_422(api: TestClient, key: str) -> None:
    headers = {"Content-Type": "application/json", "Idempotency-Key": key.encode("utf-8")}
    response = api.post("/orders", content="{" + OK + "}", headers=headers)
    body = assert_problem(response, 422)
    assert body["errors"][0]["loc"] == ["header", "idempotency-key"]


@pytest.mark.usefixtures("nothing_created")
def test_the_422_names_the_field_and_quotes_only_an_excerpt(api: TestClient) -> None:
    long = "x" * 5000
    response = api.post("/orders", json={"user_id": long, "product_id": WIDGET_ID, "quantity": 1})
    body = assert_problem(response, 422)
    [issue] = body["errors"]
    assert issue["loc"] == ["body", "user_id"] and issue["msg"]
    assert issue["input"] == "x" * 40 + "…"


# -- the reference services ------------------------------------------------------------------

BIG = "2733547318847310422221185549516931072"
FAULT = {"operation": "user.deduct", "mode": "delay"}
BAD_SERVICE_CALLS: list[Any] = [
    pytest.param("GET", f"/users/{BIG}", None, 422, id="user id beyond 64 bits"),
    pytest.param("GET", f"/products/{2**63}", None, 422, id="product id 2**63"),
    pytest.param("GET", f"/inventory/-{2**63 + 1}", None, 422, id="negative beyond 64 bits"),
    pytest.param(
        "POST",
        "/users/deduct",
        {"user_id": ORDINARY_USER_ID, "amount": 2**64, "order_id": "o"},
        422,
        id="amount beyond 64 bits",
    ),
    pytest.param(
        "POST",
        "/inventory/deduct",
        f'{{"product_id": {WIDGET_ID}, "quantity": NaN, "order_id": "o"}}',
        422,
        id="NaN quantity",
    ),
    pytest.param(
        "POST",
        "/shipping/schedule",
        f'{{"order_id": "\\ud800", "user_id": {ORDINARY_USER_ID}, "quantity": 1}}',
        422,
        id="lone surrogate order id",
    ),
    pytest.param("POST", "/_faults", {**FAULT, "seconds": False}, 422, id="seconds false"),
    pytest.param("POST", "/_faults", {**FAULT, "seconds": "1"}, 422, id="seconds string"),
    pytest.param(
        "POST",
        "/_faults",
        '{"operation": "user.deduct", "mode": "delay", "seconds": Infinity}',
        422,
        id="seconds Infinity",
    ),  # fmt: skip
    pytest.param("POST", "/_faults", {**FAULT, "seconds": 3601}, 422, id="seconds > 1 h"),
    pytest.param("POST", "/_faults", {**FAULT, "count": 10**6}, 422, id="count unbounded"),
    pytest.param("POST", "/_faults", {**FAULT, "count": True}, 422, id="count true"),
    pytest.param("POST", "/_faults", {**FAULT, "extra": 1}, 422, id="unknown field"),
]


@pytest.fixture(params=["bare", "guarded"])
def services_client(request: pytest.FixtureRequest) -> Iterator[TestClient]:
    """The services app alone, and as `order-saga services` serves it (behind BodyGuard)."""
    app = create_services_app()
    served: Any = app if request.param == "bare" else BodyGuard(app, max_bytes=CAP)
    with TestClient(served) as client:
        yield client
    app.state.store.close()


@pytest.mark.parametrize(("method", "path", "body", "status"), BAD_SERVICE_CALLS)
def test_bad_service_call_is_4xx_and_changes_nothing(
    services_client: TestClient, method: str, path: str, body: Any, status: int
) -> None:
    before = services_client.get(f"/users/{ORDINARY_USER_ID}").json()
    kwargs: dict[str, Any] = {"content": body} if isinstance(body, str) else {"json": body}
    headers = {"Content-Type": "application/json"}
    response = services_client.request(method, path, headers=headers, **kwargs)
    assert response.status_code == status, response.text
    assert len(response.content) < SMALL
    assert response.json()["detail"]
    assert services_client.get(f"/users/{ORDINARY_USER_ID}").json() == before
    assert services_client.get("/_faults").json() == {"faults": []}
    assert services_client.get("/_effects").json() == {"effects": {}}


def test_services_behind_the_guard_refuse_duplicate_keys(tmp_path: Path) -> None:
    app = create_services_app()
    with TestClient(BodyGuard(app, max_bytes=CAP)) as client:
        response = client.post(
            "/users/deduct",
            content='{"user_id": 2, "user_id": 1, "amount": 1, "order_id": "o"}',
            headers={"Content-Type": "application/json"},
        )
        assert_problem(response, 422)
        assert client.get("/_effects").json() == {"effects": {}}
    app.state.store.close()


def test_the_fault_board_is_bounded() -> None:
    app = create_services_app()
    with TestClient(app) as client:
        for _ in range(MAX_PENDING):
            assert client.post("/_faults", json=FAULT).status_code == 201
        refused = client.post("/_faults", json=FAULT)
        assert refused.status_code == 409 and "already pending" in refused.json()["detail"]
        assert len(client.get("/_faults").json()["faults"]) == MAX_PENDING
    app.state.store.close()


# A webhook URL: what aiohttp could never request is refused at `webhooks add` (the table in
# tests/test_cli.py runs the command), not retried by the relay for EVENT_MAX_AGE.
REFUSED_WEBHOOK_URLS = [
    ("http://hooks\u200b.example/in?token=T", "cannot contain"),  # IDNA 2008 refuses U+200B
    ("http://ho st.example/in", "is not a valid host name"),
    ("http://ho\x01st.example/in", "is not a valid host name"),
    ("http://a..b/in", "is not a valid host name"),
    ("http://example.com:0/in", "the port is not a number from 1 to 65535"),
    ("http://example.com:65536/in", "the port is not a number from 1 to 65535"),
    ("ftp://example.com/in", "is not an http:// or https:// URL"),
]
ACCEPTED_WEBHOOK_URLS = [
    "https://shop.example/hooks/orders?token=T",
    "http://b\u00fccher.example/in",  # an IDN: requested as xn--bcher-kva.example
    "http://[::1]:8080/in",
    "http://127.0.0.1:65535/in",
    "http://order_sink:8080/in",  # a Docker Compose service name
]


@pytest.mark.parametrize(("url", "message"), REFUSED_WEBHOOK_URLS)
def test_a_webhook_url_no_request_can_use_is_refused(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        subscriptions.webhook_url(url)


@pytest.mark.parametrize("url", ACCEPTED_WEBHOOK_URLS)
def test_a_webhook_url_a_request_can_use_is_accepted(url: str) -> None:
    assert subscriptions.webhook_url(url) == url
