"""What an operator reads without SQL: the OpenAPI document (every endpoint described with
an example, state fields as enums), `POST /orders/{id}/resolve`, log lines (JSON on demand,
request ids, quiet httpx, masked database URLs) and the worker's own /metrics port."""

from __future__ import annotations

import base64
import errno
import io
import json
import logging
import socket
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from downstream.seed import MISSING_PRODUCT_ID, ORDINARY_USER_ID, SOLD_OUT_PRODUCT_ID, WIDGET_ID
from fsm.machine import AUDIT_SCOPE
from fsm.registry import STEP_NAMES
from fsm.store import Store
from fsm.text import masked
from order_saga.logs import LogFormat, configure, flush
from tests.support.api import API
from tests.support.processes import Saga, command, run_cli
from tests.support.services import HTTP, Downstream, free_port
from tests.support.serving import Served
from tests.support.settings import saga_env, saga_settings
from tests.support.waiting import wait_until

ORDER_STATES = {
    "pending", "product_requested", "rejected", "steps_running", "completed", "compensating",
    "failed", "cancelling", "cancelled", "needs_attention", "resolved",
}  # fmt: skip


@pytest.fixture
def client(db_url: str, services_url: str) -> Iterator[TestClient]:
    app = create_app(saga_settings(db_url, services_url, **API, max_attempts=2), sweep=False)
    with TestClient(app) as c:
        yield c


def _has_example(node: Any, schemas: dict[str, Any], seen: frozenset[str] = frozenset()) -> bool:
    """An `example(s)` anywhere in `node`, following $refs into the components."""
    if isinstance(node, dict):
        if "example" in node or "examples" in node:
            return True
        ref = node.get("$ref")
        if isinstance(ref, str) and ref not in seen:
            name = ref.rsplit("/", 1)[-1]
            return _has_example(schemas.get(name, {}), schemas, seen | {ref})
        return any(_has_example(v, schemas, seen) for v in node.values())
    if isinstance(node, list):
        return any(_has_example(v, schemas, seen) for v in node)
    return False


def test_every_endpoint_has_a_description_and_an_example(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    operations = [(m, p, op) for p, ops in spec["paths"].items() for m, op in ops.items()]
    assert len(operations) >= 11
    for method, path, op in operations:
        assert op.get("description", "").strip(), f"{method.upper()} {path}: no description"
        answers = {"requestBody": op.get("requestBody"), "200": op["responses"].get("200")}
        assert _has_example(answers, schemas), f"{method.upper()} {path}: no example"
    assert not any(p.startswith("/ui") for p in spec["paths"])  # pages, not API


def test_state_fields_are_enums(client: TestClient) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    order = schemas["OrderOut"]["properties"]
    assert set(schemas[order["state"]["$ref"].rsplit("/", 1)[-1]]["enum"]) == ORDER_STATES
    step_ref = order["steps"]["additionalProperties"]["$ref"]
    assert "compensating" in schemas[step_ref.rsplit("/", 1)[-1]]["enum"]
    transition = schemas["TransitionOut"]["properties"]
    assert {"$ref": "#/components/schemas/StepState"} in transition["to_state"]["anyOf"]
    assert transition["scope"]["enum"] == ["order", *STEP_NAMES, AUDIT_SCOPE]


def test_resolve_over_http(client: TestClient, store: Store, downstream: Downstream) -> None:
    downstream.fault("user.refund", "error", count=1000)
    order = client.post(
        "/orders",
        json={"user_id": ORDINARY_USER_ID, "product_id": SOLD_OUT_PRODUCT_ID, "quantity": 1},
    ).json()
    httpx.delete(f"{downstream.url}/_faults").raise_for_status()
    assert order["status"] == "needs_attention"
    url = f"/orders/{order['id']}/resolve"
    assert client.post(url, json={"reason": "   "}).status_code == 422
    assert client.post(url, json={}).status_code == 422
    done = client.post(url, json={"reason": "refunded by hand"})
    assert done.status_code == 200, done.text
    assert (done.json()["state"], done.json()["status"]) == ("resolved", "resolved")
    log = client.get(f"/orders/{order['id']}/transitions").json()
    last = log[-1]
    assert last["trigger"] == "resolve" and last["detail"]["reason"] == "refunded by hand"
    # Idempotent, as a cancel of a cancelled order: 200, the order as it is, nothing written.
    again = client.post(url, json={"reason": "another reason"})
    assert again.status_code == 200, again.text
    assert again.json() == done.json() | {"updated_at": again.json()["updated_at"]}
    assert client.get(f"/orders/{order['id']}/transitions").json() == log
    completed = client.post(
        "/orders", json={"user_id": ORDINARY_USER_ID, "product_id": WIDGET_ID, "quantity": 1}
    ).json()
    refused = client.post(f"/orders/{completed['id']}/resolve", json={"reason": "x"})
    assert refused.status_code == 409, refused.text  # neither parked nor resolved


def test_json_logs_carry_order_fields_and_quiet_httpx() -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    configure("json", stream=stream)
    try:
        extra = {"order_id": "o-1", "state": "needs_attention", "trigger": "park"}
        logging.getLogger("order_saga.events").warning("parked", extra=extra)
        logging.getLogger("httpx").info("HTTP Request: POST http://x/users/deduct")
        colour = {"color_message": '\x1b[36m"GET /healthz"\x1b[0m 200'}  # as uvicorn adds
        logging.getLogger("uvicorn.access").info('"GET /healthz" 200', extra=colour)
    finally:
        flush()  # the writer thread writes what is queued
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    line, access = stream.getvalue().splitlines()  # httpx's INFO line is not there
    record = json.loads(line)
    assert record["order_id"] == "o-1" and record["state"] == "needs_attention"
    assert record["trigger"] == "park" and record["level"] == "WARNING"
    assert record["correlation_id"] == "-"  # outside a request
    stamp = datetime.fromisoformat(record["timestamp"])  # ISO 8601, in UTC
    assert stamp.utcoffset() == timedelta(0) and "asctime" not in record
    assert "\x1b" not in access and "color_message" not in json.loads(access)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_the_access_log_writes_no_secret_of_a_query_string(fmt: LogFormat) -> None:
    """The OpenID Connect callback's `code` (traded for tokens) and `state` went into the
    access log as sent, with the whole query string: now their values are redacted."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    configure(fmt, stream=stream)
    target = "/ui/oidc/callback?code=SECRET-CODE&St%61te=abc123&next=/ui/orders&token"
    try:  # as uvicorn's httptools/h11 protocols log a request
        logging.getLogger("uvicorn.access").info(
            '%s - "%s %s HTTP/%s" %d', "127.0.0.1:50000", "GET", target, "1.1", 401
        )
    finally:
        flush()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    (line,) = stream.getvalue().splitlines()
    assert "SECRET-CODE" not in line and "abc123" not in line, line
    assert (
        "/ui/oidc/callback?code=[redacted]&St%61te=[redacted]&next=/ui/orders&token HTTP/1.1"
        in line
    ), line


KEY = "osk_" + "Ab3_-x" * 7 + "Z"  # the shape of a key (fsm.keys): osk_ + 43 url-safe
HOOK = "whsec_" + base64.b64encode(b"\xfb\xff\xbe" * 8).decode()  # with + and / in it


def test_the_access_log_writes_no_key_or_signing_secret_anywhere(tmp_path: Path) -> None:
    """A key under a query name the log did not know (?apikey=, ?auth=), in the path, or
    inside another parameter's value (?next=/ui%3Fkey%3Dosk_...) went into serve's access
    log as sent; a webhook secret too. Now any value in our secrets' formats is redacted
    wherever it stands in the line, as sent or percent-encoded (once or twice)."""
    assert len(KEY) == 47 and ("+" in HOOK and "/" in HOOK)
    env = saga_env(
        database_url=f"sqlite:///{tmp_path}/saga.db",
        services_db=str(tmp_path / "services.db"),
        api_token="bootstrap",
        shutdown_grace=0,
    )
    served = Served(env).wait_ready()
    sent = [
        f"/orders?apikey={KEY}",
        f"/orders?status=completed&auth={KEY}",
        f"/orders/{KEY}",
        f"/ui/login?next=/ui%3Fkey%3D{KEY}%26status%3Dfailed",
        f"/ui/login?next=/ui%3Fkey%3D{quote(quote(KEY, safe=''), safe='')}",  # twice
        f"/orders?x={quote(KEY, safe='').replace('_', '%5F').replace('A', '%41')}",
        f"/orders?hook={HOOK}",
        f"/orders?hook={quote(HOOK, safe='')}",
        f"/ui/login?next=/ui%3Fhook%3D{quote(quote(HOOK, safe=''), safe='')}",
    ]
    try:
        for target in sent:
            httpx.get(f"{served.url}{target}", timeout=10)
    finally:
        output = served.stop()
    lines = [line for line in output.splitlines() if "uvicorn.access" in line]
    assert len([line for line in lines if "[redacted]" in line]) == len(sent), output
    body = KEY.removeprefix("osk_")
    hook = HOOK.removeprefix("whsec_")
    for secret in (body, hook, quote(hook, safe=""), body[:20], hook[:12]):
        assert secret not in output, (secret, output)
    assert "/orders?status=completed&auth=[redacted]" in output, output
    assert "/ui/login?next=/ui%3Fkey%3D[redacted]%26status%3Dfailed" in output, output


class _Writes(io.StringIO):
    """A stream that keeps what each flush sent out: one write to the file descriptor."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []
        self._sent = 0

    def flush(self) -> None:
        text = self.getvalue()
        if len(text) > self._sent:
            self.writes.append(text[self._sent :])
            self._sent = len(text)


def test_log_lines_go_out_in_whole_lines_a_pipe_keeps_whole() -> None:
    """`serve --workers` processes share one stderr pipe: a write longer than PIPE_BUF may
    be cut and interleaved with another's, mid-line (seen: broken JSON lines). Lines that
    queued up together go out in writes of whole lines, each at most PIPE_BUF bytes."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = _Writes()
    configure("json", stream=stream)
    try:
        log = logging.getLogger("order_saga.events")
        for i in range(400):  # queued faster than the writer's gather: batches of many
            log.warning("line %d %s", i, "é" * (i % 7))  # some not ASCII: bytes count
    finally:
        flush()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    assert len(stream.writes) > 1
    for write in stream.writes:
        assert len(write.encode()) <= 4096 and write.endswith("\n")
    lines = "".join(stream.writes).splitlines()
    assert [json.loads(line)["message"].split()[1] for line in lines] == [
        str(i) for i in range(400)
    ]


def test_database_urls_are_masked() -> None:
    assert masked("postgresql+psycopg://app:hunter2@db:5432/orders") == (
        "postgresql+psycopg://***@db:5432/orders"
    )
    assert masked("sqlite:///order-saga.db") == "sqlite:///order-saga.db"
    url = "postgresql+psycopg://app:hunter2@127.0.0.1:1/x"
    result = run_cli("db", "upgrade", ORDER_SAGA_DATABASE_URL=url)
    assert result.returncode == 1 and "//***@127.0.0.1:1/x" in result.stderr
    assert "hunter2" not in result.stderr + result.stdout


@pytest.mark.slow
async def test_worker_serves_metrics_on_its_own_port(
    db_url: str, store: Store, downstream: Downstream
) -> None:
    await store.create_order(
        user_id=ORDINARY_USER_ID, product_id=MISSING_PRODUCT_ID, quantity=1
    )  # will be rejected
    port = free_port()
    env = saga_env(database_url=db_url, services_url=downstream.url, worker_metrics_port=port)

    def metrics() -> str:
        try:
            text = HTTP.get(f"http://127.0.0.1:{port}/metrics").text
        except httpx.TransportError:
            return ""
        return text if 'order_saga_orders{status="rejected"} 1.0' in text else ""

    with Saga(command("worker", "--interval", "0.1", "--older-than", "0"), env) as worker:
        text = wait_until(metrics, what="the rejected order in /metrics", alive=worker.running)
        assert 'order_saga_orders{status="pending"} 0.0' in text  # dropped to zero
        assert "order_saga_run_seconds_count" in text
        stopped = worker.stop()
    assert stopped.returncode == 0, stopped.explain()
    stderr = stopped.stderr
    assert "order_saga.events" in stderr and "product_missing" in stderr  # a transition line


def test_workers_on_one_host_take_the_next_free_metrics_port() -> None:
    from order_saga.cli import METRICS_PORTS, first_free

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    servers: list[socket.socket] = []

    def serve(p: int) -> None:
        s = socket.socket()
        servers.append(s)
        s.bind(("127.0.0.1", p))  # raises OSError when taken, as start_http_server does

    try:
        got = first_free(port, serve)
        assert got is not None and port < got < port + METRICS_PORTS
        in_use = OSError(errno.EADDRINUSE, "taken")
        assert first_free(port, lambda p: (_ for _ in ()).throw(in_use)) is None
    finally:
        taken.close()
        for s in servers:
            s.close()
