"""Reconciling an unknown outcome (SPEC §2, §3): once a forward call may have been applied
(an attempt answered 500, or the step resumed from `requested`), an answer that is not the
service's answer for the key -- a gateway's 401/403, a 409 "a request with this key is in
progress", a refused or malformed lookup -- never marks the step failed ("had no
effect"): the answer the service holds under the key decides, or the step stays unknown
until its deadline and is then compensated. On SQLite and PostgreSQL, the live reference services
behind a gateway (tests/support/gateway.py), no mocks."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from downstream.seed import ORDINARY_USER_ID, POOR_USER_ID, WIDGET_ID
from fsm import why
from fsm.bounds import MAX_ADDRESS_CHARS, MAX_AMOUNT, MAX_DELIVERY_CHARS
from fsm.clients import Answer, Services
from fsm.executor import Executor
from fsm.models import Order
from fsm.retry import CRASHED_RUN
from fsm.store import Store, utcnow
from fsm.text import MAX_ERROR_CHARS
from fsm.wiring import build_executor
from tests.support.api import WIDGET_PRICE
from tests.support.gateway import Gateway, Rule, answering, behind_gateway
from tests.support.services import Books, Downstream, assert_conserved
from tests.support.settings import saga_settings
from tests.support.waiting import past, wait_until_async

IN_PROGRESS = {"detail": "a request with this key is in progress"}
UNAUTHORIZED = {"detail": "unauthorized"}
FORBIDDEN = {"detail": "forbidden"}
EXPIRED_AND_UNDONE = ["request", "expire", "compensate", "finish_compensation"]


@pytest.fixture
async def gateway(services_url: str) -> AsyncIterator[Gateway]:
    async with behind_gateway(services_url) as gateway:
        yield gateway


@pytest.fixture
def engine(db_url: str, store: Store, gateway: Gateway) -> Callable[..., Executor]:
    """An executor through the gateway, as `open_saga` builds it; its step deadline given."""

    def build(step_deadline: float = 60.0) -> Executor:
        settings = saga_settings(db_url, step_deadline=step_deadline)
        return build_executor(settings, store=store, services=gateway.services)

    return build


async def first_run(store: Store, executor: Executor, user: int = ORDINARY_USER_ID) -> Order:
    order, _ = await store.create_order(
        user_id=user, product_id=WIDGET_ID, quantity=1, owner=executor.owner
    )
    try:
        return await executor.drive(order)
    finally:
        await executor.aclose()


def payment(store: Store, order: Order) -> list[str]:
    return [t.trigger for t in store.history(order.id) if t.scope == "payment"]


def cut_mid_emoji(path: str, template: str) -> Rule:
    """The gateway answers 200 to `path` with `template` (`answering_200`), whose string
    holds a lone surrogate escape: a service that cut a string in the middle of an emoji's
    surrogate pair, as JavaScript and Java string slicing can."""
    return answering_200(path, template)


def answering_200(path: str, template: str) -> Rule:
    """The gateway answers 200 to `path` with `template` (JSON text, `{order_id}` filled
    in) in the service's place."""

    def rule(request: httpx.Request, n: int) -> httpx.Response | None:
        if not request.url.path.startswith(path):
            return None
        order_id = json.loads(request.content)["order_id"] if request.content else ""
        body = template.replace("{order_id}", order_id).encode()
        return httpx.Response(200, content=body, headers={"content-type": "application/json"})

    return rule


def books(downstream: Downstream, *users: int) -> Books:
    return Books.read(downstream, users=users, products=[WIDGET_ID])


async def past_the_step_deadline(store: Store, order: Order) -> None:
    deadline = store.get(order.id).deadline_at
    assert deadline is not None
    await wait_until_async(past(deadline, utcnow), what="the step's deadline to pass")


@pytest.mark.parametrize(
    ("status", "body"),
    [
        pytest.param(409, IN_PROGRESS, id="409-in-progress"),
        pytest.param(401, UNAUTHORIZED, id="401-gateway"),
        pytest.param(403, FORBIDDEN, id="403-gateway"),
    ],
)
async def test_a_4xx_after_an_unknown_outcome_takes_the_stored_answer(
    status: int,
    body: dict[str, Any],
    store: Store,
    gateway: Gateway,
    downstream: Downstream,
    engine: Callable[..., Executor],
) -> None:
    """Attempt 1 is applied and answered 500; attempt 2 (same key) meets a 4xx from the
    gateway. Before, the step was `failed` and never refunded: the order `failed` with the
    customer charged. Now the stored success is the step's answer."""
    before = books(downstream, ORDINARY_USER_ID)
    downstream.fault("user.deduct", "apply_then_error")
    gateway.rule = answering("/users/deduct", status, body, from_call=2)
    order = await first_run(store, engine())
    assert (order.status, order.payment_state) == ("completed", "succeeded")
    assert payment(store, order) == ["request", "succeed"]
    assert gateway.lookups() == 1
    assert_conserved(downstream, before, [order])


async def test_a_4xx_after_an_unknown_outcome_with_nothing_stored_expires_and_is_undone(
    store: Store,
    gateway: Gateway,
    downstream: Downstream,
    engine: Callable[..., Executor],
) -> None:
    """Attempt 1 answered 500 without effect, attempt 2 a gateway 403: nothing is stored
    under the key, so the outcome stays unknown (not `failed`) until the step's deadline,
    and is then compensated (a no-op: nothing happened)."""
    before = books(downstream, ORDINARY_USER_ID)
    executor = engine(step_deadline=1.0)
    downstream.fault("user.deduct", "error")
    gateway.rule = answering("/users/deduct", 403, FORBIDDEN, from_call=2)
    order = await first_run(store, executor)
    assert (order.state, order.payment_state) == ("steps_running", "requested")
    assert "nothing stored under its key: outcome unknown" in (order.last_error or "")
    assert order.attempts["payment:deduct"] == 2  # the 500, then the unanswered 403
    await past_the_step_deadline(store, order)
    await executor.run(order.id)
    await executor.aclose()
    final = store.get(order.id)
    assert (final.status, final.payment_state) == ("failed", "compensated")
    assert payment(store, final) == EXPIRED_AND_UNDONE
    assert_conserved(downstream, before, [final])


async def test_a_stored_no_after_an_unknown_outcome_fails_the_step(
    store: Store,
    gateway: Gateway,
    downstream: Downstream,
    engine: Callable[..., Executor],
) -> None:
    """Attempt 1 is answered 402 by the service (stored) but 500 on the way back; the retry
    gets the replayed 402, which the service holds for the key: a definite "no"."""
    before = books(downstream, POOR_USER_ID)
    downstream.fault("user.deduct", "apply_then_error")
    order = await first_run(store, engine(), POOR_USER_ID)
    assert (order.status, order.payment_state) == ("failed", "failed")
    history = [t for t in store.history(order.id) if t.scope == "payment"]
    assert [t.trigger for t in history] == ["request", "fail"]
    assert history[1].detail is not None and history[1].detail["status"] == 402
    assert gateway.lookups() == 1
    assert_conserved(downstream, before, [order])


async def test_the_first_4xx_of_a_fresh_request_is_a_no_without_a_lookup(
    store: Store,
    gateway: Gateway,
    downstream: Downstream,
    engine: Callable[..., Executor],
) -> None:
    order = await first_run(store, engine(), POOR_USER_ID)
    assert (order.status, order.payment_state) == ("failed", "failed")
    assert gateway.lookups() == 0
    assert "payment:deduct" not in order.attempts


@pytest.mark.parametrize("status", [401, 403, 400, 405])
async def test_a_refused_lookup_leaves_the_outcome_unknown(
    status: int,
    store: Store,
    gateway: Gateway,
    downstream: Downstream,
    engine: Callable[..., Executor],
) -> None:
    """The deduct is applied, every answer lost; the resumed step's reconciliation GET is
    refused by the gateway. Before, that 4xx was taken for the deduct's "no": `failed`,
    never refunded. Now the step stays `requested` until a lookup gets through."""
    before = books(downstream, ORDINARY_USER_ID)
    executor = engine()
    downstream.fault("user.deduct", "apply_then_error", count=1000)
    order = await first_run(store, executor)
    assert order.payment_state == "requested"
    downstream.clear_faults()
    gateway.rule = answering("/_operations/", status, {"detail": "refused by the gateway"})
    await executor.run(order.id)
    await executor.aclose()
    stuck = store.get(order.id)
    assert (stuck.state, stuck.payment_state) == ("steps_running", "requested")
    assert f"{status}" in (stuck.last_error or "") and "outcome unknown" in stuck.last_error
    gateway.rule = None
    await executor.run(order.id)
    await executor.aclose()
    final = store.get(order.id)
    assert (final.status, final.payment_state) == ("completed", "succeeded")
    assert payment(store, final) == ["request", "succeed"]
    assert_conserved(downstream, before, [final])


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"found": True}, id="no-status_code"),
        pytest.param({"status_code": "200", "body": {}}, id="a-string"),
    ],
)
async def test_a_malformed_lookup_is_unknown_and_expires(
    body: dict[str, Any],
    store: Store,
    gateway: Gateway,
    downstream: Downstream,
    engine: Callable[..., Executor],
) -> None:
    """A lookup answered 200 without a valid `status_code`: before, a KeyError crashed
    every run and the step never expired. Now it is an unknown outcome like any other."""
    before = books(downstream, ORDINARY_USER_ID)
    executor = engine(step_deadline=1.0)
    downstream.fault("user.deduct", "error", count=1000)
    order = await first_run(store, executor)
    assert order.payment_state == "requested"
    gateway.rule = answering("/_operations/", 200, body)
    await past_the_step_deadline(store, order)
    await executor.run(order.id)
    await executor.aclose()
    final = store.get(order.id)
    assert (final.status, final.payment_state) == ("failed", "compensated")
    assert payment(store, final) == EXPIRED_AND_UNDONE
    assert_conserved(downstream, before, [final])


@pytest.mark.parametrize(
    ("path", "template"),
    [
        pytest.param(
            "/products/",
            f'{{"id": {WIDGET_ID}, "category": "tools", "price": {WIDGET_PRICE}, '
            '"description": "widget \\ud83d"}',
            id="product-description",
        ),
        pytest.param(
            "/shipping/schedule",
            '{"order_id": "{order_id}", "status": "scheduled", '
            '"expected_delivery": "2026-12-05", "address": "Main St \\ud800"}',
            id="shipping-address",
        ),
    ],
)
async def test_a_lone_surrogate_in_an_answer_is_replaced_and_the_order_completes(
    path: str,
    template: str,
    store: Store,
    gateway: Gateway,
    engine: Callable[..., Executor],
) -> None:
    """Before, the answer's string reached the database: the shipping address made every
    run raise UnicodeEncodeError (the idempotent service repeats its answer), so the order
    stood in steps_running for ever, charged; the product's, stored in the log, made
    every read of the order's transitions fail. Now it arrives as U+FFFD."""
    gateway.rule = cut_mid_emoji(path, template)
    order = await first_run(store, engine())
    assert order.status == "completed"
    stored = store.get(order.id)
    assert stored.shipping_address is not None
    for transition in store.history(order.id):
        json.dumps(transition.detail, ensure_ascii=False).encode()  # every string is UTF-8
    if path == "/shipping/schedule":
        assert stored.shipping_address == "Main St \ufffd"
    else:
        product = next(t.detail for t in store.history(order.id) if t.trigger == "product_found")
        assert "widget \ufffd" in json.dumps(product, ensure_ascii=False)


class BrokenShipping:
    """A shipping client with a bug: scheduling always raises an error no saga code
    expects (a crash inside the run, not a failed call)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def schedule(self, *, order_id: str, user_id: int, quantity: int, key: str) -> Answer:
        raise RuntimeError("shipping client bug")

    async def cancel(self, *, order_id: str, key: str) -> Answer:
        answer: Answer = await self.inner.cancel(order_id=order_id, key=key)
        return answer

    async def lookup(self, key: str) -> Answer | None:
        answer: Answer | None = await self.inner.lookup(key)
        return answer


async def test_a_run_that_crashes_says_why_and_is_run_again_after_a_pause(
    db_url: str, store: Store, gateway: Gateway
) -> None:
    """An unexpected error ends every run from the same state the same way. Before, the
    order stood still without a word (no last error, nothing in `why`), and the sweep
    repeated the crash at every pass. Now each crashed run is noted on the order, `why`
    names the error, and the next run waits a doubling pause; once the bug is gone the
    order continues where it stood."""
    settings = saga_settings(db_url, backoff_max=1.0, park_min=30.0, park_max=60.0)
    clients = {**gateway.services.clients, "shipping": BrokenShipping(gateway.services["shipping"])}
    broken = build_executor(settings, store=store, services=Services(**clients))
    order, _ = await store.create_order(user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1)
    pauses = []
    for runs in (1, 2):
        with pytest.raises(RuntimeError, match="shipping client bug"):
            await broken.run(order.id)
        stuck = store.get(order.id)
        assert (stuck.state, stuck.attempts[CRASHED_RUN]) == ("steps_running", runs)
        assert stuck.last_error == "RuntimeError: shipping client bug"
        assert stuck.next_attempt_at is not None
        pauses.append((stuck.next_attempt_at - utcnow()).total_seconds())
        told = why.for_order(store, stuck, settings)
        assert told is not None and told.kind is why.Kind.NEXT_ATTEMPT
        assert told.call == CRASHED_RUN and told.last_error == stuck.last_error
        assert "unexpected error" in told.summary and "shipping client bug" in told.summary
    await broken.aclose()
    assert 0 < pauses[0] <= 1.0 < pauses[1] <= 2.0  # backoff_max, doubling
    fixed = build_executor(settings, store=store, services=gateway.services)
    try:
        assert (await fixed.run(order.id)).status == "completed"
    finally:
        await fixed.aclose()


async def test_a_hostile_error_detail_is_noted_and_the_other_steps_go_on(
    store: Store, gateway: Gateway, engine: Callable[..., Executor]
) -> None:
    """A 500 whose detail holds a NUL, a newline and 100 KB. Before, on PostgreSQL the
    write of `last_error` raised DataError: the run crashed, cancelling the two other calls
    in flight (their outcomes lost), and the order stood in steps_running with no word of
    why; on SQLite the whole detail went on the order and into every attempt's row."""
    detail = "refus\u00e9\u0000\nINFO order 1 completed" + "x" * 100_000
    gateway.rule = answering("/users/deduct", 500, {"detail": detail})
    order = await first_run(store, engine())
    stored = store.get(order.id)
    assert stored.state_of("inventory") == stored.state_of("shipping") == "succeeded"
    assert stored.state_of("payment") == "requested"  # unknown: retried by the next run
    error = stored.last_error
    assert error is not None and error.startswith(
        "POST /users/deduct: 500 refus\u00e9\ufffd\\nINFO"
    )
    assert "\n" not in error and len(error) <= MAX_ERROR_CHARS + 1


LONG_DATE = "2026-12-05T17:00:00+01:00[Europe/Amsterdam]"  # 43 characters


@pytest.mark.parametrize(
    ("fields", "address", "delivery"),
    [
        pytest.param(
            {"address": {"line1": "Main St 1", "country": "NL"}, "expected_delivery": "2026-12-05"},
            None,
            "2026-12-05",
            id="address-object",
        ),
        pytest.param(
            {"address": "Main St 1", "expected_delivery": LONG_DATE},
            "Main St 1",
            LONG_DATE[:MAX_DELIVERY_CHARS],
            id="date-longer-than-its-column",
        ),
        pytest.param(
            {"address": "x" * 10_000, "expected_delivery": 20261205},
            "x" * MAX_ADDRESS_CHARS,
            None,
            id="long-address-numeric-date",
        ),
    ],
)
async def test_a_shipping_answer_of_another_shape_completes_the_order(
    fields: dict[str, Any],
    address: str | None,
    delivery: str | None,
    store: Store,
    gateway: Gateway,
    engine: Callable[..., Executor],
) -> None:
    """Before, the answer's fields went into the order's typed columns as they came: an
    address object failed the write on both databases, a 43-character date on
    PostgreSQL's varchar(40); payment and stock taken, the shipment scheduled, and every
    run repeated the crash. Now only strings reach the columns, cut to their width; the
    whole answer is in the step's transition."""
    answer = {"status": "scheduled", **fields}
    gateway.rule = answering_200("/shipping/schedule", json.dumps(answer))
    order = await first_run(store, engine())
    assert order.status == "completed"
    stored = store.get(order.id)
    assert (stored.shipping_address, stored.expected_delivery) == (address, delivery)
    shipped = [t.detail for t in store.history(order.id) if t.scope == "shipping"][-1]
    assert shipped == answer


NO_PRICE = object()  # the product answer has no "price" field at all


def priced(price: object) -> Rule:
    """The gateway answers the product lookup itself: the widget at `price` (JSON-encoded as
    it is: true, -1, "100", 1.5, null), or with no price field for NO_PRICE."""
    product = {"id": WIDGET_ID, "category": "gadgets", "description": "widget", "price": price}
    if price is NO_PRICE:
        del product["price"]
    return answering_200("/products/", json.dumps(product))


@pytest.mark.parametrize(
    ("price", "quantity"),
    [
        pytest.param(MAX_AMOUNT + 1, 1, id="a-price-beyond-int64"),
        pytest.param(MAX_AMOUNT // 2 + 1, 2, id="an-amount-beyond-int64"),
        pytest.param(True, 1, id="json-true"),  # a bool is an int in Python: 1 cent
        pytest.param(-1, 1, id="a-negative-price"),
        pytest.param("100", 1, id="a-string"),
        pytest.param(1.5, 1, id="a-fraction-of-a-cent"),
        pytest.param(None, 1, id="null"),
        pytest.param(NO_PRICE, 1, id="no-price-field"),
    ],
)
async def test_a_price_that_is_no_whole_number_of_cents_or_does_not_fit_is_an_invalid_product(
    price: object, quantity: int, store: Store, gateway: Gateway, engine: Callable[..., Executor]
) -> None:
    """Before, price x quantity went to the amount column unchecked: OverflowError (SQLite)
    or NumericValueOutOfRange (PostgreSQL) at every run, the order in product_requested
    for good with no word of why. Now it is refused at the lookup as any invalid price: a
    price is a whole, non-negative number of cents, and JSON true (a Python int) is none;
    no step is started."""
    gateway.rule = priced(price)
    executor = engine()
    order, _ = await store.create_order(
        user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=quantity, owner=executor.owner
    )
    try:
        order = await executor.drive(order)
    finally:
        await executor.aclose()
    assert (order.state, order.amount) == ("failed", None)
    (last,) = store.history(order.id)[-1:]
    assert last.trigger == "product_unavailable" and last.detail["error"] == "invalid_product"
    assert payment(store, order) == []


async def test_a_3000_dollar_product_times_10000_units_fits_the_amount(
    store: Store, gateway: Gateway, engine: Callable[..., Executor], downstream: Downstream
) -> None:
    """3,000,000,000 cents: beyond PostgreSQL's 4-byte INTEGER, which the amount column was
    (NumericValueOutOfRange, the order stuck in product_requested); BIGINT since 0011."""
    gateway.rule = priced(300_000)
    executor = engine()
    order, _ = await store.create_order(
        user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=10_000, owner=executor.owner
    )
    try:
        order = await executor.drive(order)
    finally:
        await executor.aclose()
    assert store.get(order.id).amount == 3_000_000_000
    assert order.status in ("completed", "failed")  # the user service decides; it is asked
    assert payment(store, order)[:1] == ["request"]


def answering_raw(path: str, status: int, body: bytes) -> Rule:
    """The gateway answers `status` with `body` as it is (not JSON-encoded) to `path`."""

    def rule(request: httpx.Request, n: int) -> httpx.Response | None:
        if not request.url.path.startswith(path):
            return None
        return httpx.Response(status, content=body, headers={"content-type": "application/json"})

    return rule


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(
            json.dumps({"detail": "refus\u00e9\u0000\nINFO done" + "x" * 5000}), id="500-nul"
        ),
        pytest.param('{"order_id": "x", "status": "cancelled", "eta_hours": NaN}', id="200-NaN"),
    ],
)
async def test_a_hostile_answer_to_a_compensation_parks_the_order_with_a_storable_error(
    body: str, store: Store, gateway: Gateway, engine: Callable[..., Executor]
) -> None:
    """The compensation path is classified as the forward one. Before, on PostgreSQL the
    NUL failed the write of last_error and NaN the write of the cancel's transition: every
    run crashed and the order stood compensating with no word of why."""
    status = 200 if "NaN" in body else 500
    gateway.rule = answering_raw("/shipping/cancel", status, body.encode())
    order = await first_run(store, engine(), POOR_USER_ID)  # payment refused: compensate
    parked = store.get(order.id)
    assert (parked.state, parked.shipping_state) == ("needs_attention", "compensating")
    error = parked.last_error
    assert error is not None and error.startswith("POST /shipping/cancel: ")
    assert "\n" not in error and "\x00" not in error and len(error) <= MAX_ERROR_CHARS + 1
    gateway.rule = None
    executor = engine()
    try:
        final = await executor.run(order.id)
    finally:
        await executor.aclose()
    assert (final.state, final.shipping_state) == ("failed", "compensated")
