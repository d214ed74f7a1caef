"""The OpenAPI document says what the API answers (SPEC §4: errors are problem+json, 503
with Retry-After, 202 with Location): every documented error answer's content type and
headers, then real answers of each kind held against their operation's entry, on SQLite
and PostgreSQL."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.diagram import Renderer
from downstream.seed import MISSING_PRODUCT_ID
from fsm.diagram import GraphvizMissing
from tests.support.api import TOKEN, api, place

PROBLEM = "application/problem+json"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# The one error answer whose body is not a problem: the rejected order (SPEC §4).
OWN_BODY = {("post", "/orders", "404")}


@pytest.fixture
def client(db_url: str, services_url: str) -> Iterator[TestClient]:
    with api(db_url, services_url, api_token=TOKEN) as c:
        yield c


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, items in doc["paths"].items():
        for method, operation in items.items():
            yield method, path, operation


def test_every_documented_error_is_a_problem_and_every_503_names_retry_after(
    client: TestClient,
) -> None:
    doc = client.get("/openapi.json", headers=AUTH).json()
    wrong = []
    for method, path, operation in operations(doc):
        for code, answer in operation["responses"].items():
            if int(code) < 400:
                continue
            media = sorted(answer.get("content", {}))
            expected = ["application/json"] if (method, path, code) in OWN_BODY else [PROBLEM]
            if media != expected:
                wrong.append(f"{method.upper()} {path} {code}: {media}")
            if code == "503" and "Retry-After" not in answer.get("headers", {}):
                wrong.append(f"{method.upper()} {path} 503 without Retry-After")
    assert not wrong, "\n".join(wrong)
    accepted = doc["paths"]["/orders"]["post"]["responses"]["202"]
    assert "Location" in accepted.get("headers", {})
    assert "415" in doc["paths"]["/orders"]["post"]["responses"]


def _template(doc: dict[str, Any], path: str) -> str:
    for template in doc["paths"]:
        pattern = re.sub(r"\{[^}]+\}", "[^/]+", template)
        if re.fullmatch(pattern, path):
            return template
    raise AssertionError(f"{path} is not documented")


def assert_documented(doc: dict[str, Any], response: Any) -> dict[str, Any]:
    """The real answer's status is documented for its operation, with its content type
    (and a problem's `code`), and the headers the entry requires are sent."""
    request = response.request
    template = _template(doc, request.url.path)
    operation = doc["paths"][template][request.method.lower()]
    where = f"{request.method} {template} {response.status_code}"
    answer = operation["responses"].get(str(response.status_code))
    assert answer is not None, f"{where} undocumented: {response.text[:200]}"
    media = response.headers["content-type"].split(";")[0]
    assert media in answer.get("content", {}), f"{where}: {media} not in {answer}"
    for header, spec in answer.get("headers", {}).items():
        if spec.get("required"):
            assert header in response.headers, f"{where}: no {header}"
    body: dict[str, Any] = response.json()
    if media == PROBLEM:
        assert body.get("code"), f"{where}: a problem without a code: {body}"
    return body


def test_real_answers_match_their_documented_entries(client: TestClient) -> None:
    doc = client.get("/openapi.json", headers=AUTH).json()
    rejected = place(client, product=MISSING_PRODUCT_ID, headers=AUTH)
    assert assert_documented(doc, rejected)["status"] == "rejected"
    order_id = rejected.json()["id"]
    running = place(client, headers={**AUTH, "Prefer": "respond-async"})
    assert running.status_code == 202, running.text
    assert running.headers["Location"] == f"/orders/{assert_documented(doc, running)['id']}"
    unknown = uuid.uuid4()

    def missing(fmt: str, history: Any) -> bytes:
        raise GraphvizMissing()

    client.app.state.diagrams = Renderer(concurrency=1, draw=missing)  # type: ignore[attr-defined]
    order = '{"user_id": 1, "product_id": 1, "quantity": 1}'
    answers = {
        "order_not_found": client.get(f"/orders/{unknown}", headers=AUTH),
        "order_not_found ": client.get(f"/orders/{unknown}/diagram", headers=AUTH),
        "graphviz_missing": client.get(
            f"/orders/{order_id}/diagram", params={"format": "png"}, headers=AUTH
        ),
        "unsupported_media_type": client.post(
            "/orders", content=order, headers={**AUTH, "Content-Type": "text/plain"}
        ),
        "unsupported_charset": client.post(
            "/orders",
            content=order,
            headers={**AUTH, "Content-Type": "application/json; charset=latin-1"},
        ),
        "invalid_request": client.post("/orders", json={"user_id": 1}, headers=AUTH),
        "unauthorized": client.get("/orders"),
    }
    for code, response in answers.items():
        assert assert_documented(doc, response)["code"] == code.strip(), response.text
