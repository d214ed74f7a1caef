"""The README stays true: its design-table examples produce the statuses it claims, and the
curl bodies it shows are the ones in the table."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from fsm.settings import Settings
from tests.conftest import Downstream

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
ROW = re.compile(
    r"^\| (found|404) \|.*\| (\w+)(?: \(HTTP 404\))? \| [^|]+ \| `(\{.*\})` \|$", re.MULTILINE
)
TABLE = [(json.loads(body), status) for _, status, body in ROW.findall(README)]
CURLS = re.findall(r"-d '(\{\"user_id\".*?\})'", README)


def test_the_readme_shows_every_row_of_the_design_table() -> None:
    assert len(TABLE) == 7
    statuses = [status for _, status in TABLE]
    assert statuses.count("failed") == 5 and {"completed", "rejected"} <= set(statuses)
    for body, _ in TABLE:  # each row has its curl example
        assert json.dumps(body, separators=(",", ":")) in CURLS


@pytest.mark.parametrize(("body", "status"), TABLE, ids=[s for _, s in TABLE])
def test_readme_row_reproduces_its_status(
    body: dict[str, int], status: str, db_url: str, downstream: Downstream
) -> None:
    url = downstream.url
    settings = Settings(
        database_url=db_url, product_url=url, user_url=url, inventory_url=url, shipping_url=url
    )
    with TestClient(create_app(settings, sweep=False)) as client:
        response = client.post("/orders", json=body)
    assert response.status_code == (404 if status == "rejected" else 201)
    assert response.json()["status"] == status
