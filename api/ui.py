"""The operator page at /ui: server-rendered Jinja2 templates, no JavaScript needed and no
asset from outside the package (works on a machine without internet).

Orders by status with filters and paging (parked first), one order's page (steps,
timeline, its diagram lit), actions behind a confirmation page (resume, retry
compensation, cancel, mark resolved) and the heatmap of the whole machine. Every action is
a machine transition done by the executor or `fsm.operator`, so the audit trail is the
transition log itself. HTTP <-> store/executor only: no business rules here.
"""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from api import flash, login
from api.access import ROUTES
from api.auth import principal_of
from api.deps import ExecutorDep, PrincipalDep, SettingsDep, StoreDep
from api.login import CsrfChecked
from api.runner import Runner
from fsm import diagram, heatmap, operator, queries, rollup, why
from fsm.bounds import MAX_ID
from fsm.errors import CorruptOrder, InvalidMove, SagaError, StoreUnavailable
from fsm.executor import new_owner
from fsm.machine import (
    TERMINAL_ORDER_STATES,
    OperatorAction,
    OrderState,
    Status,
    StepState,
    is_terminal,
)

HERE = Path(__file__).resolve().parent
log = logging.getLogger("order_saga.api")
templates = Jinja2Templates(directory=HERE / "templates")
templates.env.filters["duration"] = heatmap.duration
static = StaticFiles(directory=HERE / "static")
# Pages for people, not an API: left out of the OpenAPI schema.
router = APIRouter(prefix="/ui", include_in_schema=False)  # who may: api/access.py
PAGE = 25


class Window(StrEnum):
    HOUR = "hour"
    DAY = "day"
    ALL = "all"


WINDOWS = {Window.HOUR: timedelta(hours=1), Window.DAY: timedelta(days=1), Window.ALL: None}


class Action(StrEnum):
    RESUME = "resume"
    RETRY = "retry"
    CANCEL = "cancel"
    RESOLVE = "resolve"


# what the transition log's audit row calls each button
AUDITED = {
    Action.RESUME: OperatorAction.RESUME,
    Action.RETRY: OperatorAction.RETRY_COMPENSATION,
    Action.CANCEL: OperatorAction.CANCEL,
    Action.RESOLVE: OperatorAction.RESOLVE,
}


# action -> (button label, what it does, allowed in these states)
ACTIONS: dict[str, tuple[str, str, frozenset[str]]] = {
    "resume": (
        "Resume",
        "Drive the order on from its persisted state now (ignores the retry schedule).",
        frozenset(s.value for s in OrderState)
        - {s.value for s in TERMINAL_ORDER_STATES}
        - {OrderState.NEEDS_ATTENTION.value},
    ),
    "retry": (
        "Retry compensation",
        "Try the parked compensation (or cancellation) again now.",
        frozenset({OrderState.NEEDS_ATTENTION.value}),
    ),
    "cancel": (
        "Cancel order",
        "Refund the user, restore the stock and cancel the shipment of this completed order.",
        frozenset({OrderState.COMPLETED.value}),
    ),
    "resolve": (
        "Mark resolved",
        "End this parked order as fixed by hand (needs_attention -> resolved). "
        "Nothing is called; your reason is kept in the transition log.",
        frozenset({OrderState.NEEDS_ATTENTION.value}),
    ),
}


def _inline_svg(document: bytes) -> str:
    """Graphviz's SVG without its XML prolog, to embed in the page."""
    text = document.decode()
    return text[text.index("<svg") :]


def _page(request: Request, name: str, **context: Any) -> HTMLResponse:
    """A page, told who is looking: their name, whether they may act (the same table the
    edge enforces), the session's CSRF token for every form."""
    principal = principal_of(request.scope)
    session = request.scope.get("session")
    act = ROUTES[("POST", "/ui/orders/{order_id}/{action}")]
    return templates.TemplateResponse(
        request,
        name,
        {
            "principal": principal,
            "signed_in": session is not None,
            "csrf": session.csrf if session is not None else "",
            "can_act": act.admits(principal.role),
            **context,
        },
    )


login_router = login.install(templates)


@router.get("", response_class=HTMLResponse, summary="Orders by status (operator page)")
def orders_page(
    request: Request,
    store: StoreDep,
    settings: SettingsDep,
    status: Annotated[Status | None, Query()] = None,
    state: Annotated[OrderState | None, Query()] = None,
    product: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    user: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    older_than: Annotated[float | None, Query(ge=0, description="seconds unmoved")] = None,
    id: Annotated[str | None, Query(max_length=36, pattern=r"^\s*[0-9a-fA-F-]*\s*$")] = None,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
) -> Response:
    """Counts per status, the filtered orders (parked first), one page at a time; `id`
    finds orders by their full id (straight to its page) or the start of it."""
    id = (id or "").strip() or None
    if id is not None:
        try:
            return RedirectResponse(f"/ui/orders/{uuid.UUID(id)}", status_code=303)
        except ValueError:
            pass  # the start of an id: list what matches
    flt = queries.OrderFilter(
        status=status,
        state=state,
        product_id=product,
        user_id=user,
        older_than=older_than,
        id_prefix=id,
        limit=PAGE,
        offset=offset,
        parked_first=True,
    )
    page = queries.list_orders(store, flt)
    found, total = page.items, page.total
    params = {
        k: v
        for k, v in {
            "status": status,
            "state": state,
            "product": product,
            "user": user,
            "older_than": older_than,
            "id": id,
        }.items()
        if v is not None
    }

    def link(**changes: Any) -> str:
        merged = {**params, **changes}
        return "/ui?" + urlencode({k: v for k, v in merged.items() if v not in (None, "")})

    return _page(
        request,
        "orders.html",
        orders=found,
        total=total,
        counts=queries.counts_by_status(store),
        flt=flt,
        statuses=[s.value for s in Status],
        states=[s.value for s in OrderState],
        prev_link=link(offset=max(0, offset - PAGE)) if offset else None,
        next_link=link(offset=offset + PAGE) if offset + PAGE < total else None,
        status_link=lambda s: link(status=s, offset=None),
        age=queries.age,
        search=id or "",
        unreadable=lambda o: isinstance(o, queries.Unreadable),
        whys=why.for_orders(store, page.orders, settings, console=True),
    )


@router.get("/orders/{order_id}", response_class=HTMLResponse, summary="One order")
def order_page(
    request: Request,
    order_id: uuid.UUID,
    store: StoreDep,
    settings: SettingsDep,
    message: Annotated[str | None, Query(max_length=2000)] = None,
) -> HTMLResponse:
    """Amount, steps, why it is parked, its timeline and its diagram with the path lit;
    what the last action did when `message` is one this console signed (`api.flash`)."""
    try:
        order = store.get(order_id)
    except CorruptOrder as exc:  # shown as what it is: the raw row and its log
        return _page(
            request,
            "unreadable.html",
            order_id=order_id,
            why=str(exc),
            spans=queries.timeline(store.history(order_id)),
        )
    history = store.history(order_id)
    try:
        svg = _inline_svg(diagram.render("svg", history))
    except diagram.GraphvizMissing as exc:
        svg = f"<p class='warn'>{exc}</p>"
    actions = {name: spec for name, spec in ACTIONS.items() if order.state in spec[2]}
    spans = queries.timeline(history)
    tried = queries.attempts(store, order_id)
    entries: list[tuple[str, Any]] = sorted(
        [("transition", s) for s in spans] + [("attempt", a) for a in tried],
        key=lambda e: e[1].at,
    )
    return _page(
        request,
        "order.html",
        order=order,
        why=why.for_order(store, order, settings, console=True),
        entries=entries,
        steps=order.step_states(),
        spans=spans,
        svg=svg,
        actions=actions,
        final=is_terminal(order.state),
        **flash.read(request, message),
    )


@router.get("/orders/{order_id}/{action}", response_class=HTMLResponse, summary="Confirm")
def confirm_page(
    request: Request, order_id: uuid.UUID, action: Action, store: StoreDep
) -> HTMLResponse:
    """The confirmation step of an action (nothing changes until it is submitted)."""
    order = store.get(order_id)
    label, what, states = ACTIONS[action]
    return _page(
        request,
        "confirm.html",
        order=order,
        action=action,
        label=label,
        what=what,
        allowed=order.state in states,
    )


@router.post("/orders/{order_id}/{action}", summary="Do an action")
async def act(
    request: Request,
    order_id: uuid.UUID,
    action: Action,
    store: StoreDep,
    executor: ExecutorDep,
    principal: PrincipalDep,
    _: CsrfChecked,
    reason: Annotated[str, Form(max_length=1000)] = "",
) -> RedirectResponse:
    """Run the confirmed action, then back to the order's page with what happened. Only
    in the states the action is offered in (what the confirmation page says), checked
    under the order's lease by the executor or `fsm.operator`: a retry of compensation on
    an order that is not parked would drive it forward instead."""
    label, _what, allowed = ACTIONS[action]
    audit = operator.Audit(AUDITED[action], principal.audit, reason, channel="console")
    try:
        if action in (Action.RESUME, Action.RETRY, Action.CANCEL):
            prepare = executor.prepare_cancel if action is Action.CANCEL else executor.prepare_run
            order, run = await prepare(order_id, audit=audit, allowed=allowed)
            # In the background as the API's runs: the page answers within RESPOND_WITHIN.
            runner: Runner = request.app.state.runner
            task = runner.adopt(order, run)
            if not await runner.within(task):
                still = f"{label}: still running, now {order.state} ({order.status})"
                return await _redirect(request, order_id, done=f"{still}; reload to follow it")
            order = task.result()
        else:
            if not reason.strip():
                return await _redirect(
                    request, order_id, error="a reason is required to mark an order resolved"
                )
            resolved = await operator.resolve(
                store,
                order_id,
                reason=reason,
                owner=new_owner(),
                operator=principal.name,
                audit=audit,
                allowed=allowed,
            )
            if resolved.already:  # a second submit: idempotent, as the CLI and the API
                return await _redirect(request, order_id, done=f"{label}: already resolved")
            order = resolved.order
    except InvalidMove as exc:
        return await _redirect(request, order_id, error=f"{label}: {exc}")
    except StoreUnavailable as exc:  # the driver's words (host, port) to the log only
        log.warning("%s: %s", label, exc)
        return await _redirect(request, order_id, error=f"{label}: {exc.public}")
    except SagaError as exc:
        return await _redirect(request, order_id, error=str(exc))
    return await _redirect(request, order_id, done=f"{label}: now {order.state} ({order.status})")


async def _redirect(request: Request, order_id: uuid.UUID, **message: str) -> RedirectResponse:
    return await flash.redirect(request, f"/ui/orders/{order_id}", **message)


@router.get("/heatmap", response_class=HTMLResponse, summary="Heatmap of the machine")
def heatmap_page(request: Request, store: StoreDep, window: Window = Window.ALL) -> HTMLResponse:
    """Per state: how many orders passed, p50/p95 time there, how many sit there now; per
    edge: how many took it. Counted from the transition log, drawn on the diagram."""
    span = WINDOWS[window]
    rollup.refresh(store.engine)  # folds the log written since the last load
    heat = queries.heat(store, since=None if span is None else queries.utcnow() - span)
    try:
        svg = _inline_svg(heatmap.heat_svg(heat))
    except diagram.GraphvizMissing as exc:
        svg = f"<p class='warn'>{exc}</p>"
    rows = sorted(heat.states.items(), key=lambda kv: (kv[0][0] != "order", kv[0]))
    return _page(
        request, "heatmap.html", svg=svg, rows=rows, declared=declared, window=window.value
    )


def declared(scope: str, state: str) -> bool:
    """Is `state` a state of this machine (for `scope`: the order, or a step)?"""
    known = OrderState if scope == "order" else StepState
    return state in {s.value for s in known}
