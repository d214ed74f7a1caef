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
from typing import Any

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


def run_block(
    block: str, probe: str, cwd: Path, *, timeout: float = 180, **settings: str
) -> subprocess.CompletedProcess[str]:
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
    env.update({f"ORDER_SAGA_{k.upper()}": v for k, v in settings.items()})
    return subprocess.run(
        ["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
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
    assert "database at head: postgresql+psycopg://***@127.0.0.1:5432/" in result.stdout


@pytest.mark.slow
def json_documents(text: str) -> list[Any]:
    """The top-level JSON objects in `text`, in order (nested ones are part of theirs)."""
    decoder, found, at = json.JSONDecoder(), [], 0
    while (start := text.find('{"', at)) != -1:
        value, at = decoder.raw_decode(text, start)
        found.append(value)
    return found


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
    health, orders = json_documents(result.stdout)
    # /health also reports the machine version and the breakers (issue 10); this block
    # only promises a healthy SQLite database
    assert {k: health[k] for k in ("status", "database")} == {"status": "ok", "database": "sqlite"}
    assert orders == {
        "orders": [],
        "unreadable": [],
        "total": 0,
        "limit": 50,
        "offset": 0,
        "next_cursor": None,
    }


@pytest.mark.slow
def test_the_park_recipe_parks_with_the_default_settings(tmp_path: Path) -> None:
    """The operator section as a new user runs it next to `make run`: every setting at
    its default (only the port swapped), the order parks, is listed, shown and resolved;
    then a completed order is cancelled and `resume --json` prints one JSON summary."""
    api = free_port()
    park = shell_block("Park one and fix it").replace("8000", str(api))
    listing = "order-saga orders list --status needs_attention"
    assert listing in park
    park = park.replace(listing, f"{listing}\n{listing} --json > parked.json")
    others = shell_block("The other operator commands:").replace("8000", str(api))
    others = re.sub(r"^(order-saga resume .*?)(\s+#.*)?$", r"\1 > resume.json", others, flags=re.M)
    block = f"order-saga serve --port {api} &   # make run PORT={api}\n{park}\n{others}"
    probe = "order-saga orders show $ID --json > resolved.json"
    # ten commands, each an interpreter start: minutes on a busy 2-core machine
    result = run_block(
        block,
        probe,
        tmp_path,
        timeout=900,
        fallback_services_url=f"http://127.0.0.1:{api}/services",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    parked = json.loads((tmp_path / "parked.json").read_text())
    assert parked["total"] == 1, parked  # one order in needs_attention, with its reason
    [order] = parked["orders"]
    assert order["state"] == "needs_attention"
    assert "payment refund did not succeed" in order["attention_reason"]
    resolved = json.loads((tmp_path / "resolved.json").read_text())
    assert (resolved["id"], resolved["state"]) == (order["id"], "resolved")
    assert "refunded by hand, OPS-42" in result.stdout + json.dumps(resolved)
    summary = json.loads((tmp_path / "resume.json").read_text())  # one JSON document
    assert summary["still_parked"] == [] and summary["errors"] == 0


def test_make_run_takes_a_port() -> None:
    root = Path(__file__).resolve().parent.parent
    dry = subprocess.run(
        ["make", "-n", "-o", ".venv/.installed", "run", "PORT=8123"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dry.returncode == 0, dry.stderr
    assert "order-saga serve --host 127.0.0.1 --port 8123" in dry.stdout
