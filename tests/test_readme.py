"""The README stays true: its design-table examples produce the statuses it claims, and the
curl bodies it shows are the ones in the table."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from downstream.seed import ORDINARY_USER_ID, WIDGET_ID
from tests.support.database import drop_pg_database
from tests.support.services import Downstream, free_port
from tests.support.settings import cli_settings

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
    settings = cli_settings(db_url, downstream.url)
    with TestClient(create_app(settings, sweep=False)) as client:
        response = client.post("/orders", json=body)
    assert response.status_code == (404 if status == "rejected" else 201)
    assert response.json()["status"] == status


# -- the shell blocks of "On PostgreSQL with several workers" and "Configuration", run as
# written (issue 11, item 19): only the database name and the ports are swapped for
# scratch ones, the processes they start are stopped at the end. ----------------------------


def shell_block(after_heading: str) -> str:
    """The first ```sh block after the heading line."""
    tail = README[README.index(after_heading) :]
    match = re.search(r"```sh\n(.*?)```", tail, re.DOTALL)
    assert match is not None, after_heading
    return match.group(1)


def run_block(block: str, probe: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run `block` then `probe` in bash (-e: any failing command fails the test); the
    background jobs the block starts are killed on exit."""
    # A user waits for a server they started before typing the next line; so does this.
    block = re.sub(
        r"^(order-saga serve --port (\d+) &.*)$",
        r"\1\nwait_for http://127.0.0.1:\2/healthz",
        block,
        flags=re.MULTILINE,
    )
    script = "\n".join(
        [
            "set -euo pipefail",
            "trap 'kill $(jobs -p) 2>/dev/null || true; wait' EXIT",
            'wait_for() { for _ in $(seq 300); do curl -s -o /dev/null "$1" && return 0;'
            ' sleep 0.1; done; echo "$1 never answered" >&2; return 1; }',
            block,
            probe,
        ]
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORDER_SAGA_")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    return subprocess.run(
        ["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=180
    )


@pytest.mark.slow
def test_the_postgresql_block_runs_as_written(tmp_path: Path) -> None:
    name = f"readme_{uuid.uuid4().hex[:10]}"
    api, services = free_port(), free_port()
    block = shell_block("### On PostgreSQL with several workers")
    assert "createdb" in block.split("order-saga db upgrade")[0]  # before the upgrade
    block = (
        block.replace(" orders ", f" {name} ")
        .replace("/orders\n", f"/{name}\n")
        .replace("8100", str(services))
        .replace("8000", str(api))
    )
    probe = f"""
wait_for http://127.0.0.1:{api}/healthz
curl -sf -X POST http://127.0.0.1:{api}/orders -H 'Content-Type: application/json' \\
     -d '{{"user_id":{ORDINARY_USER_ID},"product_id":{WIDGET_ID},"quantity":1}}'
"""
    try:
        result = run_block(block, probe, tmp_path)
    finally:
        drop_pg_database(name)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["status"] == "completed"
    assert "database at head: postgresql+psycopg://postgres@127.0.0.1:5432/" in result.stdout


@pytest.mark.slow
def test_the_configuration_block_runs_as_written(tmp_path: Path) -> None:
    api = free_port()
    block = shell_block("## Configuration").replace("8000", str(api))
    assert "ORDER_SAGA_API_TOKEN=change-me" in block
    probe = f"""
test "$(curl -s -o /dev/null -w '%{{http_code}}' localhost:{api}/orders)" = 401
"""
    result = run_block(block, probe, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("database at head: sqlite:///order-saga.db\n")
    # curl's answers, among serve's access log lines (curl ends with no newline)
    decoder = json.JSONDecoder()
    health, orders = (
        decoder.raw_decode(result.stdout[m.start() :])[0]
        for m in re.finditer(r'\{"', result.stdout)
    )
    # /health also reports the machine version and the breakers (issue 10); this block
    # only promises a healthy SQLite database
    assert {k: health[k] for k in ("status", "database")} == {"status": "ok", "database": "sqlite"}
    assert orders == {"orders": [], "limit": 50, "offset": 0}
