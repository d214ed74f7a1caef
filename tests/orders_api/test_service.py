"""The API as a service: `/healthz`, `/metrics`, the OpenAPI document, and a corrupt row
answered as a clear 500 without writing anything."""

from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient

from fsm.store import make_engine
from tests.support.api import (
    place,
)

# -- operations --------------------------------------------------------------------------


def test_healthz(client: TestClient, db_url: str) -> None:
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.json()["status"] == "ok"
    assert response.json()["database"] == (
        "sqlite" if db_url.startswith("sqlite") else "postgresql"
    )


def test_metrics_are_prometheus_text(client: TestClient) -> None:
    place(client)

    response = client.get("/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert "# TYPE order_saga_transitions_total counter" in text
    assert 'order_saga_transitions_total{scope="order",trigger="all_succeeded"}' in text
    assert 'order_saga_orders{status="completed"} 1.0' in text


@pytest.mark.parametrize(
    ("path", "method"),
    [
        pytest.param("/orders", "post", id="create"),
        pytest.param("/orders", "get", id="list"),
        pytest.param("/orders/{order_id}", "get", id="one-order"),
        pytest.param("/orders/{order_id}/transitions", "get", id="transitions"),
        pytest.param("/orders/{order_id}/cancel", "post", id="cancel"),
        pytest.param("/orders/{order_id}/resume", "post", id="resume"),
        pytest.param("/healthz", "get", id="healthz"),
        pytest.param("/metrics", "get", id="metrics"),
        pytest.param("/diagram", "get", id="diagram"),
        pytest.param("/orders/{order_id}/diagram", "get", id="order-diagram"),
    ],
)
def test_openapi_lists_the_order_paths(sqlite_client: TestClient, path: str, method: str) -> None:
    response = sqlite_client.get("/openapi.json")

    assert response.status_code == 200
    assert method in response.json()["paths"][path]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        pytest.param("GET", "/orders/{id}", id="read"),
        pytest.param("POST", "/orders/{id}/resume", id="resume"),
    ],
)
def test_corrupt_row_is_a_clear_500_and_writes_nothing(
    client: TestClient, db_url: str, method: str, path: str
) -> None:
    from sqlalchemy import text

    order_id = place(client).json()["id"]
    engine = make_engine(db_url)
    key = uuid.UUID(order_id).hex if engine.dialect.name == "sqlite" else order_id
    with engine.begin() as conn:
        conn.execute(text("UPDATE orders SET state = 'warp_drive' WHERE id = :id"), {"id": key})

    response = client.request(method, path.format(id=order_id))

    assert response.status_code == 500
    assert response.json()["detail"] == (
        f"order {order_id} is corrupt: state = 'warp_drive' is not one of the machine's states"
    )
    with engine.connect() as conn:
        count = conn.execute(text("SELECT count(*) FROM transitions")).scalar_one()
    engine.dispose()
    assert count == 9  # the completed order's history, nothing added
