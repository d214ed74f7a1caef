"""`ORDER_SAGA_API_TOKEN`: with a token configured, every order route needs
`Authorization: Bearer <token>` (401 otherwise, changing nothing); health and metrics do not."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.support.api import (
    TOKEN,
    assert_message,
    place,
)
from tests.support.services import Downstream

WRONG_AUTH = [
    pytest.param({}, id="no-header"),
    pytest.param({"Authorization": "Bearer nope"}, id="wrong-token"),
    pytest.param({"Authorization": f"Bearer {TOKEN[:-1]}"}, id="token-prefix"),
    pytest.param({"Authorization": f"Basic {TOKEN}"}, id="basic-scheme"),
    pytest.param({"Authorization": TOKEN}, id="bare-token"),
]
GOOD_AUTH = {"Authorization": f"Bearer {TOKEN}"}
ORDER_READS = [
    pytest.param("/orders/{id}", id="one-order"),
    pytest.param("/orders", id="list"),
    pytest.param("/orders/{id}/transitions", id="transitions"),
]


@pytest.mark.parametrize("headers", WRONG_AUTH)
def test_mutations_need_the_token(
    secured: TestClient, downstream: Downstream, headers: dict[str, str]
) -> None:
    order_id = place(secured, headers=GOOD_AUTH).json()["id"]
    effects = downstream.effects()

    answers = [
        place(secured, headers=headers),
        secured.post(f"/orders/{order_id}/cancel", headers=headers),
        secured.post(f"/orders/{order_id}/resume", headers=headers),
    ]

    for response in answers:
        assert response.status_code == 401, (response.request.url, response.text)
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert_message(response)
    assert len(secured.get("/orders", headers=GOOD_AUTH).json()["orders"]) == 1
    assert secured.get(f"/orders/{order_id}", headers=GOOD_AUTH).json()["status"] == "completed"
    assert downstream.effects() == effects


def test_mutations_succeed_with_the_token(secured: TestClient) -> None:
    created = place(secured, headers=GOOD_AUTH)
    assert created.status_code == 201, created.text
    order_id = created.json()["id"]

    resumed = secured.post(f"/orders/{order_id}/resume", headers=GOOD_AUTH)
    cancelled = secured.post(f"/orders/{order_id}/cancel", headers=GOOD_AUTH)

    assert resumed.status_code == 200, resumed.text
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"


@pytest.mark.parametrize("path", ORDER_READS)
def test_reads_need_the_token_too(secured: TestClient, path: str) -> None:
    order_id = place(secured, headers=GOOD_AUTH).json()["id"]
    url = path.format(id=order_id)

    assert secured.get(url).status_code == 401
    assert secured.get(url, headers=GOOD_AUTH).status_code == 200


@pytest.mark.parametrize("path", ["/healthz", "/metrics"])
def test_health_and_metrics_need_no_token(secured: TestClient, path: str) -> None:
    assert secured.get(path).status_code == 200


def test_head_is_get_without_the_body(secured: TestClient) -> None:
    """`curl -I` (RFC 9110 §9.3.2): every GET route answers HEAD with the GET's status and
    headers, no body; the gate judges it as the GET; a path without GET names HEAD
    nowhere in its Allow."""
    order_id = place(secured, headers=GOOD_AUTH).json()["id"]
    for path, headers in [
        ("/healthz", {}),
        ("/metrics", {}),
        (f"/orders/{order_id}", GOOD_AUTH),
        ("/orders", GOOD_AUTH),
        ("/diagram?format=mermaid", GOOD_AUTH),
    ]:
        got = secured.get(path, headers=headers)
        head = secured.head(path, headers=headers)
        assert (head.status_code, head.content) == (200, b""), path
        assert head.headers["content-type"] == got.headers["content-type"], path
        assert int(head.headers["content-length"]) > 0, path
    refused = secured.head(f"/orders/{order_id}")
    assert (refused.status_code, refused.content) == (401, b"")
    only_post = secured.head(f"/orders/{order_id}/resume", headers=GOOD_AUTH)
    assert only_post.status_code == 405 and only_post.content == b""
    assert only_post.headers["Allow"] == "POST"
    assert secured.options("/healthz", headers=GOOD_AUTH).headers["Allow"] == "GET, HEAD"
