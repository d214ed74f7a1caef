"""`order-saga webhooks` as an operator meets it (issue 19, review rev-events): the embedded
sink behind the API token is warned about, an empty --events is refused, one endpoint is
subscribed once however its URL is written, `remove` says what it dropped and `rotate`
replaces a secret keeping the webhook. Both databases; the command runs in this process
(CliRunner), endpoints over real HTTP."""

from __future__ import annotations

import asyncio
import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import standardwebhooks
from click.testing import CliRunner, Result
from sqlalchemy import text
from typer.main import get_command

from api.app import create_app
from downstream.seed import ORDINARY_USER_ID, WIDGET_ID
from fsm import outbox, subscriptions
from fsm.destinations.webhook import (
    destination_keys,
    fingerprint,
    new_secret,
    new_session,
    post,
    signed_headers,
    signing_key,
    signing_keys,
)
from fsm.sql import parse_utc
from fsm.store import Store, utcnow
from order_saga.cli import app
from tests.support.endpoint import Endpoint
from tests.support.events import FAST_EVENTS, order_by_order_until, relaying
from tests.support.services import LiveServer
from tests.support.settings import saga_env, saga_settings
from tests.support.waiting import wait_until_async

TOKEN = "webhooks-cli-admin-token"


def webhooks(db_url: str, *args: str, services_url: str | None = None, **fields: str) -> Result:
    env = saga_env(database_url=db_url, services_url=services_url, **fields)
    return CliRunner().invoke(get_command(app), ["webhooks", *args], env=env)


SINK_WARNING = "order-saga: warning: this looks like this deployment's embedded sink"


def test_adding_the_embedded_sink_while_auth_is_on_warns_in_one_line(db_url: str) -> None:
    """The README's recipe with ORDER_SAGA_API_TOKEN set: every event would get 401."""
    sink = "http://127.0.0.1:8000/services/sink"
    added = webhooks(db_url, "add", sink, api_token=TOKEN)
    assert added.exit_code == 0, added.output
    assert added.stderr.startswith(SINK_WARNING), added.stderr
    assert len(added.stderr.splitlines()) == 1
    assert "order-saga services" in added.stderr and TOKEN not in added.stderr
    # No token (every path open), or service URLs of its own (no embedded sink): no warning.
    other = "http://127.0.0.1:8000/services/sink/"  # a trailing slash: the same endpoint
    assert webhooks(db_url, "remove", sink).exit_code == 0
    quiet = webhooks(db_url, "add", other)
    assert quiet.exit_code == 0 and quiet.stderr == "", quiet.output
    assert webhooks(db_url, "remove", other).exit_code == 0
    external = webhooks(db_url, "add", sink, services_url="http://127.0.0.1:8100", api_token=TOKEN)
    assert external.exit_code == 0 and external.stderr == "", external.output


async def test_webhooks_test_of_the_embedded_sink_behind_the_token_says_why(
    db_url: str, tmp_path: Path
) -> None:
    """A real `serve` app with the token set: its /services/sink answers the relay's
    (and the test's) unauthenticated POST with 401, and the command says what to do."""
    settings = saga_settings(db_url, api_token=TOKEN, services_db=str(tmp_path / "s.db"))
    with LiveServer(create_app(settings, sweep=False), lifespan="on") as server:
        url = f"{server.url}/services/sink"
        assert webhooks(db_url, "add", url, api_token=TOKEN).exit_code == 0
        tested = await asyncio.to_thread(webhooks, db_url, "test", url, api_token=TOKEN)
    assert tested.exit_code == 1, tested.output
    assert tested.stderr.startswith(f"order-saga: {url}: HTTP 401: this looks like"), tested.stderr
    assert "order-saga services" in tested.stderr
    assert len(tested.stderr.splitlines()) == 1


@pytest.mark.parametrize("given", ["", " ", ",", " , "])
def test_an_empty_events_list_is_refused(db_url: str, store: Store, given: str) -> None:
    """Not read as "the default types" (a subscription to what nobody asked for)."""
    added = webhooks(db_url, "add", "http://127.0.0.1:9/hook", "--events", given)
    assert added.exit_code == 2, added.output
    assert added.stderr.startswith("order-saga: --events: no event type given"), added.stderr
    assert len(added.stderr.splitlines()) == 1
    assert subscriptions.destinations(store) == []


@pytest.mark.parametrize(
    "variant",
    [
        "HTTP://127.0.0.1:47102/hook",
        "http://127.0.0.1:47102/hook/",
        "http://127.0.0.1:47102/hook?",
        "http://127.0.0.1:47102/hook#",
        "http://127.0.0.1:47102/hook#part",
        "http://127.0.0.1:47102/hook//",
    ],
)
def test_one_endpoint_is_subscribed_once_however_its_url_is_written(
    db_url: str, store: Store, variant: str
) -> None:
    first = webhooks(db_url, "add", "http://127.0.0.1:47102/hook")
    assert first.exit_code == 0, first.output
    again = webhooks(db_url, "add", variant)
    assert again.exit_code == 1, again.output
    assert "is subscribed already" in again.stderr, again.stderr
    assert [d.url for d in subscriptions.destinations(store)] == ["http://127.0.0.1:47102/hook"]


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("HTTPS://Hooks.Example.COM:443/Path?", "https://hooks.example.com/Path"),
        ("http://EXAMPLE.com:80", "http://example.com/"),
        ("http://[::1]:8080/x#y", "http://[::1]:8080/x"),
        ("https://example.com:8443/a/?q=1", "https://example.com:8443/a/?q=1"),
    ],
)
def test_a_webhook_is_stored_normalised_and_found_as_written(
    db_url: str, store: Store, given: str, stored: str
) -> None:
    added = webhooks(db_url, "add", given, "--json")
    assert added.exit_code == 0, added.output
    assert f'"url": "{stored}"' in added.stdout
    assert [d.url for d in subscriptions.destinations(store)] == [stored]
    # The URL as first written still names it.
    assert webhooks(db_url, "remove", given).exit_code == 0
    assert subscriptions.destinations(store) == []


def test_a_url_stored_before_normalising_still_blocks_its_variants(store: Store) -> None:
    """A webhook added by an older version (stored as written) is compared by its endpoint."""
    from functools import partial

    from fsm import outbox_sql
    from fsm.destinations.webhook import new_secret
    from fsm.store import utcnow

    legacy = "HTTP://127.0.0.1:47102/hook/"
    store.committer.call(
        partial(
            outbox_sql.add_destination,
            store.dialect,
            name=legacy,
            kind="webhook",
            url=legacy,
            secret=new_secret(),
            events=outbox.subscription(outbox.DEFAULT_TYPES),
            now=utcnow(),
        )
    )
    with pytest.raises(ValueError, match=f"subscribed already, as {legacy}"):
        subscriptions.add_webhook(store, "http://127.0.0.1:47102/hook", outbox.DEFAULT_TYPES)


async def _created_orders(store: Store, n: int) -> None:
    for _ in range(n):  # each commits its order.created event
        await store.create_order(user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1)


async def test_remove_says_how_many_undelivered_events_it_dropped(
    db_url: str, store: Store
) -> None:
    added = subscriptions.add_webhook(store, "http://127.0.0.1:9/hook", outbox.DEFAULT_TYPES)
    await _created_orders(store, 3)
    removed = await asyncio.to_thread(webhooks, db_url, "remove", str(added.destination.id))
    assert removed.exit_code == 0, removed.output
    assert removed.stdout == (
        f"removed webhook {added.destination.id}: http://127.0.0.1:9/hook\n"
        "3 undelivered events dropped\n"
    )
    assert subscriptions.destinations(store) == []


@pytest.mark.parametrize("overlap", ["86400", "0"])
async def test_rotate_keeps_the_webhook_and_its_backlog_and_signs_with_the_new_secret(
    db_url: str, store: Store, overlap: str
) -> None:
    """Not remove + add (a new id, the backlog dropped): the events waiting when the secret
    was rotated are delivered, signed with the new secret (and, during the overlap, the old
    one too: a consumer that has not switched yet still verifies)."""
    async with Endpoint() as endpoint:
        added = subscriptions.add_webhook(store, endpoint.url, outbox.DEFAULT_TYPES)
        await _created_orders(store, 2)
        args = ("rotate", endpoint.url, "--overlap", overlap, "--json")
        result = await asyncio.to_thread(webhooks, db_url, *args)
        assert result.exit_code == 0, result.output
        told = json.loads(result.stdout)
        assert told["id"] == added.destination.id and told["secret"] != added.secret
        assert (told["old_signs_until"] is None) == (overlap == "0")
        (backlog,) = subscriptions.backlog(store)
        assert (backlog.destination.id, backlog.pending) == (added.destination.id, 2)
        async with relaying(store, saga_settings(db_url, **FAST_EVENTS)):
            await wait_until_async(lambda: len(endpoint.requests) >= 2, what="both events")
    assert [d.id for d in subscriptions.destinations(store)] == [added.destination.id]
    new, old = standardwebhooks.Webhook(told["secret"]), standardwebhooks.Webhook(added.secret)
    for request in endpoint.requests:
        assert new.verify(request.body, request.headers) == request.event
        if overlap == "0":
            with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
                old.verify(request.body, request.headers)
        else:
            assert old.verify(request.body, request.headers) == request.event
    assert sorted(r.event["type"] for r in endpoint.requests) == ["order.created"] * 2


async def test_a_running_relay_signs_with_the_rotated_secret(db_url: str, store: Store) -> None:
    """A relay already delivering when the secret is rotated signs the next events with the
    new one (it reads its destinations again): a leaked secret stops signing at once with
    `--overlap 0`."""
    async with Endpoint() as endpoint:
        added = subscriptions.add_webhook(store, endpoint.url, outbox.DEFAULT_TYPES)
        async with relaying(store, saga_settings(db_url, **FAST_EVENTS)):
            await _created_orders(store, 1)
            await wait_until_async(lambda: len(endpoint.requests) >= 1, what="the first event")
            args = ("rotate", endpoint.url, "--overlap", "0", "--json")
            result = await asyncio.to_thread(webhooks, db_url, *args)
            assert result.exit_code == 0, result.output
            new = json.loads(result.stdout)["secret"]
            last = await order_by_order_until(
                store,
                endpoint,
                lambda r: r.signatures == 1 and r.signed_by(new),
                what="an event signed anew",
            )
    assert not last.signed_by(added.secret)


def stored_secrets(store: Store, destination_id: int) -> tuple[str, str | None, datetime | None]:
    """A webhook's `secret`, `previous_secret` and `previous_until`, as stored."""
    with store.engine.connect() as conn:
        secret, previous, until = conn.execute(
            text(
                "SELECT secret, previous_secret, previous_until FROM event_destinations "
                "WHERE id = :id"
            ),
            {"id": destination_id},
        ).one()
    return secret, previous, parse_utc(until)


# Long enough for a running relay to read the rotated webhook (every 2 s) within it.
OVERLAP = 5


async def test_a_running_relay_signs_with_both_secrets_during_an_overlap_and_the_new_one_after(
    db_url: str, store: Store
) -> None:
    """`rotate --overlap` while a relay delivers: `secret` holds the new secret alone, the
    old one and its end columns of their own; the relay's next events carry two signatures,
    one per secret, until that end, and the new one's alone from then on."""
    async with Endpoint() as endpoint:
        added = subscriptions.add_webhook(store, endpoint.url, outbox.DEFAULT_TYPES)
        async with relaying(store, saga_settings(db_url, **FAST_EVENTS)):
            await _created_orders(store, 1)
            await wait_until_async(lambda: len(endpoint.requests) >= 1, what="the first event")
            args = ("rotate", endpoint.url, "--overlap", str(OVERLAP), "--json")
            result = await asyncio.to_thread(webhooks, db_url, *args)
            assert result.exit_code == 0, result.output
            told = json.loads(result.stdout)
            new, until = told["secret"], datetime.fromisoformat(told["old_signs_until"])
            assert stored_secrets(store, added.destination.id) == (new, added.secret, until)
            both = await order_by_order_until(
                store,
                endpoint,
                lambda r: r.signed_by(new) and r.signed_by(added.secret),
                what="an event signed with both secrets",
            )
            assert both.signatures == 2
            await wait_until_async(lambda: utcnow() >= until, what="the overlap's end")
            after = await order_by_order_until(  # not one signed before the end, arriving after
                store,
                endpoint,
                lambda r: int(r.headers["webhook-timestamp"]) >= until.timestamp(),
                what="an event signed after the overlap",
            )
    assert after.signed_by(new) and not after.signed_by(added.secret)
    assert after.signatures == 1


async def test_a_relay_of_the_previous_release_signs_with_the_new_secret_after_a_rotation(
    db_url: str, store: Store
) -> None:
    """A release before `rotate` reads `secret` as one secret, `signing_key(secret)` (its
    relay and its `webhooks test`). After `rotate` with an overlap it signs with the new
    secret, which a consumer holding the new one takes: `secret` used to hold
    `<new> <old>@<until>`, which no key decodes from, and such a relay stopped delivering to
    the webhook until it was upgraded. This release signs with both (`webhooks test` as
    its relay)."""
    async with Endpoint() as endpoint:
        added = subscriptions.add_webhook(store, endpoint.url, outbox.DEFAULT_TYPES)
        ident = str(added.destination.id)
        result = await asyncio.to_thread(webhooks, db_url, "rotate", ident, "--json")
        assert result.exit_code == 0, result.output
        new = json.loads(result.stdout)["secret"]
        with store.engine.connect() as conn:  # that release's read of it
            secret = conn.execute(
                text("SELECT secret FROM event_destinations WHERE id = :id"),
                {"id": added.destination.id},
            ).scalar_one()
        msg_id, body = subscriptions.test_event(added.destination)
        async with new_session() as session:
            key = signing_key(secret)
            sent = await post(session, endpoint.url, [(key, math.inf)], msg_id, body, 1.0)
        assert sent.delivered, sent.error
        (previous_release,) = endpoint.requests
        assert previous_release.signed_by(new) and not previous_release.signed_by(added.secret)
        tested = await asyncio.to_thread(webhooks, db_url, "test", ident)
        assert tested.exit_code == 0, tested.output
    this_release = endpoint.requests[-1]
    assert this_release.signed_by(new) and this_release.signed_by(added.secret)
    assert this_release.signatures == 2


def test_an_overlap_past_its_end_signs_with_the_new_secret_alone() -> None:
    old, new, now = new_secret(), new_secret(), datetime.now(UTC)
    during = signed_headers(
        signing_keys(new, old, now + timedelta(seconds=60), fingerprint(new)), "m:0", b"{}"
    )
    after = signed_headers(
        signing_keys(new, old, now - timedelta(seconds=1), fingerprint(new)), "m:0", b"{}"
    )
    assert len(during["webhook-signature"].split()) == 2
    assert len(after["webhook-signature"].split()) == 1
    standardwebhooks.Webhook(new).verify(b"{}", after)
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(old).verify(b"{}", after)


def test_rotate_of_no_such_webhook_is_one_line(db_url: str, store: Store) -> None:
    result = webhooks(db_url, "rotate", "7")
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("order-saga: no webhook '7'"), result.stderr


async def test_webhooks_test_of_a_secret_that_does_not_decode_is_one_line_then_rotate_fixes_it(
    db_url: str, store: Store
) -> None:
    """A secret edited by hand or cut short was a traceback (binascii.Error) and exit 0:
    now one line naming the way out, exit 1; the rotation it names works."""
    async with Endpoint() as endpoint:
        added = subscriptions.add_webhook(store, endpoint.url, outbox.DEFAULT_TYPES)
        ident = str(added.destination.id)
        with store.engine.begin() as connection:  # base64 whose padding is cut off
            connection.execute(
                text("UPDATE event_destinations SET secret = 'whsec_abc' WHERE id = :id"),
                {"id": added.destination.id},
            )
        refused = await asyncio.to_thread(webhooks, db_url, "test", ident)
        assert refused.exit_code == 1, refused.output
        assert refused.stderr == (
            f"order-saga: {endpoint.url}: its signing secret is unreadable (Incorrect padding);"
            f" `order-saga webhooks rotate {ident} --overlap 0` gives it a new one\n"
        )
        assert endpoint.requests == []
        rotated = await asyncio.to_thread(webhooks, db_url, "rotate", ident, "--overlap", "0")
        assert rotated.exit_code == 0, rotated.output
        tested = await asyncio.to_thread(webhooks, db_url, "test", ident)
        assert tested.exit_code == 0, tested.output
    assert len(endpoint.requests) == 1


async def test_a_rotation_by_the_previous_release_ends_this_release_s_overlap(
    db_url: str, store: Store
) -> None:
    """This release rotates with an overlap (the old secret in `previous_secret`); the
    release before, still running mid-deploy, rotates with `--overlap 0`, which writes
    `secret` alone and says "the old secret signs no more". The columns then belonged to
    a secret no longer there: the relay kept signing with the twice-replaced secret until
    the first overlap's end. Now only the new secret signs."""
    async with Endpoint() as endpoint:
        added = subscriptions.add_webhook(store, endpoint.url, outbox.DEFAULT_TYPES)
        ident = str(added.destination.id)
        rotated = await asyncio.to_thread(webhooks, db_url, "rotate", ident, "--json")
        assert rotated.exit_code == 0, rotated.output
        theirs = new_secret()
        with store.engine.begin() as connection:  # that release's `rotate --overlap 0`
            connection.execute(
                text("UPDATE event_destinations SET secret = :s WHERE id = :id"),
                {"s": theirs, "id": added.destination.id},
            )
        keys = destination_keys(subscriptions.find(store, ident))
        assert keys == [(signing_key(theirs), math.inf)]
        tested = await asyncio.to_thread(webhooks, db_url, "test", ident)
        assert tested.exit_code == 0, tested.output
    (request,) = endpoint.requests
    assert request.signed_by(theirs) and request.signatures == 1


def test_a_previous_secret_past_its_end_is_not_decoded() -> None:
    """What an overlap that has ended holds no longer matters: a cut value there failed
    the webhook's whole key set (the relay skipped a webhook whose secret is fine)."""
    current = new_secret()
    ended = datetime.now(UTC) - timedelta(days=30)
    keys = signing_keys(current, "whsec_not*base64", ended, fingerprint(current))
    assert keys == [(signing_key(current), math.inf)]
