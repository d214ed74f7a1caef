"""Issue 17, items 1, 2 and 4: client keys with roles, idempotency per caller, the audit
trail with names. On SQLite and PostgreSQL, against the real reference services."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

from api.app import create_app
from api.auth import Authenticator
from downstream.seed import ORDINARY_USER_ID, SOLD_OUT_PRODUCT_ID, WIDGET_ID
from fsm import keys
from fsm.machine import AUDIT_SCOPE
from fsm.roles import Role
from fsm.store import Store
from order_saga.orders_cli import LOCAL_ADMIN
from tests.support.api import TOKEN, WIDGET_PRICE, api, place
from tests.support.database import stuck_orders
from tests.support.processes import run_saga
from tests.support.services import Downstream
from tests.support.settings import cli_settings, saga_env
from tests.support.waiting import wait_until


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def team(store: Store) -> dict[str, str]:
    """One key per role, two clients; name -> secret."""
    made = {
        "shop-a": Role.CLIENT,
        "shop-b": Role.CLIENT,
        "auditor": Role.READER,
        "ops-alice": Role.OPERATOR,
        "root": Role.ADMIN,
    }
    return {n: keys.create_key(engine=store.engine, name=n, role=r) for n, r in made.items()}


@pytest.fixture
def client(db_url: str, services_url: str, team: dict[str, str]) -> Iterator[TestClient]:
    with api(db_url, services_url, api_token=TOKEN) as c:
        yield c


def test_a_client_sees_and_cancels_only_its_own_orders(
    client: TestClient, team: dict[str, str]
) -> None:
    a, b = bearer(team["shop-a"]), bearer(team["shop-b"])
    placed = place(client, headers=a)
    assert placed.status_code == 201, placed.text
    oid = placed.json()["id"]
    # Another client's order is a 404 like an order that does not exist: no oracle.
    for method, path in [
        ("GET", f"/orders/{oid}"),
        ("GET", f"/orders/{oid}/transitions"),
        ("GET", f"/orders/{oid}/diagram"),
        ("POST", f"/orders/{oid}/cancel"),
    ]:
        response = client.request(method, path, headers=b)
        assert response.status_code == 404, (method, path, response.text)
        assert team["shop-b"] not in response.text
    assert client.get("/orders", headers=b).json()["orders"] == []
    assert [o["id"] for o in client.get("/orders", headers=a).json()["orders"]] == [oid]
    assert client.get(f"/orders/{oid}", headers=a).status_code == 200
    # a reader reads everything, changes nothing
    reader = bearer(team["auditor"])
    assert client.get(f"/orders/{oid}", headers=reader).status_code == 200
    assert [o["id"] for o in client.get("/orders", headers=reader).json()["orders"]] == [oid]
    assert place(client, headers=reader).status_code == 403
    assert client.post(f"/orders/{oid}/cancel", headers=reader).status_code == 403
    # a client may not resume; the owner may cancel its own
    assert client.post(f"/orders/{oid}/resume", headers=a).status_code == 403
    cancelled = client.post(f"/orders/{oid}/cancel", headers=a)
    assert cancelled.json()["status"] == "cancelled", cancelled.text


def test_roles_on_the_embedded_services_and_wrong_or_missing_keys(
    client: TestClient, team: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    settings = cli_settings(db_url, services_db=str(tmp_path / "s.db"))
    with TestClient(create_app(settings, sweep=False)) as embedded:  # /services mounted
        for who, status in [("root", 200), ("ops-alice", 403), ("shop-a", 403)]:
            answer = embedded.get("/services/_faults", headers=bearer(team[who]))
            assert answer.status_code == status, (who, answer.text)
        assert embedded.get("/services/_faults").status_code == 401
    assert client.get("/orders").status_code == 401
    wrong = team["shop-a"][:-2] + ("xx" if not team["shop-a"].endswith("xx") else "yy")
    refused = client.get("/orders", headers=bearer(wrong))
    assert refused.status_code == 401
    assert wrong not in refused.text
    assert client.get("/healthz").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_a_revoked_key_is_refused_within_five_seconds(
    client: TestClient, team: dict[str, str], store: Store
) -> None:
    reader = bearer(team["auditor"])
    assert client.get("/orders", headers=reader).status_code == 200  # cached as good now
    keys.revoke_key(engine=store.engine, name="auditor")
    # the contract (SPEC §4): refused within 5 s, everywhere
    wait_until(
        lambda: client.get("/orders", headers=reader).status_code == 401,
        timeout=5.0,
        what="the revoked key to be refused",
    )
    assert client.get("/orders", headers=bearer(team["shop-a"])).status_code == 200


def test_idempotency_keys_are_scoped_per_caller(
    client: TestClient, team: dict[str, str], downstream: Downstream
) -> None:
    before = downstream.balance(ORDINARY_USER_ID)
    same = {"Idempotency-Key": "checkout-42"}
    first_a = place(client, headers={**bearer(team["shop-a"]), **same})
    first_b = place(client, headers={**bearer(team["shop-b"]), **same})
    retry_a = place(client, headers={**bearer(team["shop-a"]), **same})
    assert first_a.status_code == first_b.status_code == 201, (first_a.text, first_b.text)
    assert first_a.json()["id"] != first_b.json()["id"]  # two clients: two orders
    assert retry_a.json()["id"] == first_a.json()["id"]  # one client retrying: one order
    # charged once per order: twice in all, not three times
    assert downstream.balance(ORDINARY_USER_ID) == before - 2 * WIDGET_PRICE
    effects = downstream.effects()
    for order in (first_a.json()["id"], first_b.json()["id"]):
        assert effects.get(f"{order}:payment:deduct") == 1, effects


def _audit_rows(client: TestClient, oid: str, headers: dict[str, str]) -> list[dict[str, Any]]:
    log = client.get(f"/orders/{oid}/transitions", headers=headers).json()
    return [row for row in log if row["scope"] == AUDIT_SCOPE]


def test_operator_actions_name_the_operator_in_the_log(
    client: TestClient, team: dict[str, str], store: Store
) -> None:
    ops = bearer(team["ops-alice"])
    stuck, _ = asyncio.run(
        store.create_order(user_id=ORDINARY_USER_ID, product_id=SOLD_OUT_PRODUCT_ID, quantity=1)
    )
    resumed = client.post(f"/orders/{stuck.id}/resume?reason=stuck+since+deploy", headers=ops)
    assert resumed.status_code == 200, resumed.text
    (row,) = _audit_rows(client, str(stuck.id), ops)
    assert row["trigger"] == "resume"
    assert row["from_state"] == row["to_state"] == "pending"
    assert row["detail"] == {
        "by": "ops-alice",
        "as": "operator",
        "via": "key",
        "channel": "api",
        "reason": "stuck since deploy",
    }
    # the console's button, with the same key: its own row, naming the channel
    oid = place(client, headers=bearer(team["shop-a"])).json()["id"]
    done = client.post(
        f"/ui/orders/{oid}/cancel",
        data={"reason": "customer called"},
        headers=ops,
        follow_redirects=False,
    )
    assert done.status_code == 303, done.text
    (row,) = _audit_rows(client, oid, ops)
    assert (row["trigger"], row["detail"]["by"], row["detail"]["channel"]) == (
        "cancel",
        "ops-alice",
        "console",
    )
    assert client.get(f"/orders/{oid}", headers=ops).json()["status"] == "cancelled"


def test_resolve_over_the_api_names_the_callers_key_never_a_name_it_sends(
    client: TestClient, team: dict[str, str], store: Store, downstream: Downstream
) -> None:
    ops = bearer(team["ops-alice"])
    downstream.fault("user.refund", "error", count=1000)
    oid = place(client, product=SOLD_OUT_PRODUCT_ID, headers=bearer(team["shop-a"])).json()["id"]
    downstream.clear_faults()
    assert client.get(f"/orders/{oid}", headers=ops).json()["status"] == "needs_attention"
    path = f"/orders/{oid}/resolve"
    forged = client.post(path, json={"reason": "refunded", "operator": "root"}, headers=ops)
    assert forged.status_code == 422, forged.text  # the body does not say who did it
    assert store.get(uuid.UUID(oid)).state == "needs_attention"
    done = client.post(path, json={"reason": "refunded by hand"}, headers=ops)
    assert done.status_code == 200, done.text
    log = client.get(f"/orders/{oid}/transitions", headers=ops).json()
    (resolved,) = [t for t in log if (t["scope"], t["trigger"]) == ("order", "resolve")]
    (audit,) = _audit_rows(client, oid, ops)
    assert resolved["detail"]["operator"] == audit["detail"]["by"] == "ops-alice"


@pytest.mark.slow
def test_keys_cli_and_the_cli_acting_as_someone(
    db_url: str, services_url: str, store: Store, downstream: Downstream
) -> None:
    env = saga_env(database_url=db_url, services_url=services_url)
    made = run_saga("keys", "create", "checkout", "--role", "client", env=env)
    assert made.returncode == 0, made.explain()
    secret = made.stdout.strip()
    assert secret.startswith("osk_") and len(secret) > 40
    again = run_saga("keys", "create", "checkout", "--role", "reader", env=env)
    assert again.returncode == 2 and "exists already" in again.stderr
    bad = run_saga("keys", "create", "checkout", "--role", "boss", env=env)
    assert bad.returncode == 2
    listed = run_saga("keys", "list", "--json", env=env)
    assert listed.returncode == 0, listed.explain()
    (row,) = json.loads(listed.stdout)
    assert (row["name"], row["role"], row["revoked_at"]) == ("checkout", "client", None)
    plain = run_saga("keys", "list", env=env)
    gone = run_saga("keys", "revoke", "checkout", env=env)
    assert gone.returncode == 0, gone.explain()
    twice = run_saga("keys", "revoke", "checkout", env=env)
    assert twice.returncode == 1 and "revoked already" in twice.stderr
    for result in (listed, plain, gone, twice, again, bad):
        assert secret not in result.stdout + result.stderr
        assert secret[4:20] not in result.stdout + result.stderr
    assert keys.find_key(engine=store.engine, digest="0" * 64) is None

    # the CLI acts as the local admin; --as names the person in the audit row
    order, _ = asyncio.run(
        store.create_order(user_id=ORDINARY_USER_ID, product_id=SOLD_OUT_PRODUCT_ID, quantity=1)
    )
    resumed = run_saga(
        "resume", "--order", str(order.id), "--as", "bob", "--reason", "INC-7", env=env
    )
    assert resumed.returncode == 0, resumed.explain()
    (row,) = [t for t in store.history(order.id) if t.scope == AUDIT_SCOPE]
    assert row.detail is not None
    assert (row.trigger, row.detail["by"], row.detail["via"], row.detail["reason"]) == (
        "resume",
        "bob",
        "cli",
        "INC-7",
    )
    shown = run_saga("orders", "show", str(order.id), "--json", env=env)
    timeline = json.loads(shown.stdout)["timeline"]
    assert any(s["scope"] == AUDIT_SCOPE and s["detail"]["by"] == "bob" for s in timeline)


def test_revoking_a_name_that_is_not_utf8_is_a_one_line_error(db_url: str, store: Store) -> None:
    """`keys revoke "$(printf 'b\\xff')"`: a shell may pass any bytes; the name is checked
    like `create` checks it (no key can have it), one line and exit 1, never a traceback
    from the driver failing to encode it."""
    keys.create_key(engine=store.engine, name="b", role=Role.CLIENT)
    env = saga_env(database_url=db_url)
    refused = run_saga("keys", "revoke", "b\udcff", env=env)  # argv bytes b"b\xff"
    assert refused.returncode == 1, refused.explain()
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("order-saga: bad key name"), refused.explain()
    assert "Traceback" not in refused.stderr
    assert keys.live_role(engine=store.engine, name="b") is Role.CLIENT  # nothing revoked


@pytest.mark.slow
def test_a_bulk_resume_names_who_on_every_order_it_resumes(
    db_url: str, services_url: str, store: Store
) -> None:
    """`order-saga resume` (no --order) is a person's action on each order it drives: each
    one's log gets its own audit row, naming `--as` or, without it, the local admin."""
    env = saga_env(database_url=db_url, services_url=services_url)

    def resume_all(*args: str) -> list[uuid.UUID]:
        stuck = stuck_orders(store, 2, user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1)
        done = run_saga("resume", "--older-than", "0", *args, env=env)
        assert done.returncode == 0, done.explain()
        assert "resumed 2" in done.stdout, done.explain()
        return stuck

    def audit_of(oid: uuid.UUID) -> dict[str, Any]:
        (row,) = [t for t in store.history(oid) if t.scope == AUDIT_SCOPE]
        assert row.trigger == "resume" and row.from_state == row.to_state == "pending"
        assert row.detail is not None
        return row.detail

    for oid in resume_all("--as", "carol", "--reason", "INC-9 after the deploy"):
        detail = audit_of(oid)
        assert (detail["by"], detail["as"], detail["via"], detail["channel"]) == (
            "carol",
            "admin",
            "cli",
            "cli",
        )
        assert detail["reason"] == "INC-9 after the deploy"
        assert store.get(oid).status == "completed"
    for oid in resume_all():  # only the new ones: the first two are terminal now
        detail = audit_of(oid)
        assert (detail["by"], detail["via"]) == (LOCAL_ADMIN, "cli")
        assert "reason" not in detail


def test_a_key_is_read_once_however_many_requests_wait_for_it(store: Store) -> None:
    """The gate's cache (issue 17, "no slower"): 32 requests that find a key missing or
    expired share one read; a revoked key is still refused within the cache's time.
    Before, each request that came while the entry was expired read (and wrote
    `last_used_at`) itself."""
    ttl = 1.0
    secret = keys.create_key(engine=store.engine, name="busy-shop", role=Role.CLIENT)
    auth = Authenticator(store.engine, api_token=None, ttl=ttl)
    reads: list[float] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().startswith("SELECT") and "api_keys.key_hash" in statement:
            reads.append(time.monotonic())

    async def callers(n: int) -> set[str | None]:
        found = await asyncio.gather(*(auth.bearer(secret.encode(), "/orders") for _ in range(n)))
        return {p.name if p else None for p in found}

    async def scenario() -> None:
        assert await callers(32) == {"busy-shop"}
        assert len(reads) == 1
        assert await callers(32) == {"busy-shop"}  # cached
        assert len(reads) == 1
        await asyncio.sleep(ttl + 0.1)  # expired: the next 32 share the next read
        assert await callers(32) == {"busy-shop"}
        assert len(reads) == 2
        keys.revoke_key(engine=store.engine, name="busy-shop")
        revoked = time.monotonic()
        while await callers(4) != {None}:
            assert time.monotonic() - revoked < ttl + 1.0, "the revoked key still works"
            await asyncio.sleep(0.05)
        await auth.settle()

    event.listen(store.engine, "before_cursor_execute", count)
    try:
        asyncio.run(scenario())
    finally:
        event.remove(store.engine, "before_cursor_execute", count)
