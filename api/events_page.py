"""The console's order-events page at /ui/events (issue 19): every destination (webhooks
and RabbitMQ) with its backlog and lag, the dead letters, the latest deliveries, and a
Redeliver button per dead letter and for all of them.

Readers see the page; the Redeliver form is shown to, and accepted from, operators and
admins only (`api.access`), with the session's CSRF token like every console form. A
webhook's full URL (its path or query may hold a Slack/Discord-style token) is shown to
admins only; everyone else sees its `label`, `webhook:<id> scheme://host[:port]`. The
reads and the redelivery are `fsm.subscriptions`' (what `order-saga events list` and
`events redeliver` run): HTTP <-> those calls only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Annotated

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from api import flash
from api.access import ADMIN, ROUTES
from api.auth import principal_of
from api.deps import StoreDep
from api.login import CsrfChecked
from api.ui import _page as page
from fsm import outbox, outbox_sql, subscriptions
from fsm.store import utcnow

router = APIRouter(prefix="/ui", include_in_schema=False)  # who may: api/access.py
REDELIVER = ("POST", "/ui/events/redeliver")
ALL = "all"
SHOWN = 50  # dead letters and latest deliveries shown, each
# Who sees a webhook's full URL here: it may carry the token that lets anyone post to the
# endpoint, and what is sent where (`webhooks add`, its secret) is an admin's business;
# readers and operators get the label /metrics and /healthz use.
FULL_URL = ADMIN


@router.get("/events", response_class=HTMLResponse, summary="Order events (operator page)")
def events_page(
    request: Request,
    store: StoreDep,
    message: Annotated[str | None, Query(max_length=2000)] = None,
) -> HTMLResponse:
    """Destinations with their pending count and lag, dead letters, latest deliveries."""
    now = utcnow()
    backlog = subscriptions.backlog(store)
    where, scrub = _shown(
        (b.destination for b in backlog), full=FULL_URL.admits(principal_of(request.scope).role)
    )
    destinations = [
        {
            "id": b.destination.id,
            "where": where(b.destination.name),
            "kind": b.destination.kind,
            "events": outbox.subscribed(b.destination.events),
            "pending": b.pending,
            "dead": b.dead,
            "lag": (now - b.oldest_pending).total_seconds() if b.oldest_pending else 0.0,
        }
        for b in backlog
    ]
    return page(
        request,
        "events.html",
        destinations=destinations,
        dead=subscriptions.deliveries(store, failed=True, limit=SHOWN),
        latest=subscriptions.deliveries(store, limit=SHOWN),
        order_of=lambda event_id: outbox_sql.split_id(event_id)[0],
        where=where,
        scrub=scrub,
        can_redeliver=ROUTES[REDELIVER].admits(principal_of(request.scope).role),
        **flash.read(request, message),
    )


@router.post("/events/redeliver", summary="Redeliver dead letters")
async def redeliver(
    request: Request,
    store: StoreDep,
    _: CsrfChecked,
    event: Annotated[str, Form(max_length=200)] = "",
) -> RedirectResponse:
    """One dead-lettered event (with its order's other dead events, the earliest first, so
    order holds), or `all` of them, back in line for the relay; then back to the page
    saying how many (and which goes first, when an earlier one does)."""
    event = event.strip()
    if not event:
        return await _back(request, error="say which event to redeliver (or all)")
    try:
        revived = await subscriptions.redeliver_async(store, None if event == ALL else event)
    except ValueError as exc:
        return await _back(request, error=str(exc))
    if revived.count == 0:
        return await _back(
            request, error=f"no dead letter {event!r} (delivered or redelivered already?)"
        )
    what = "every dead letter" if event == ALL else event
    said = revived.said(None if event == ALL else event)
    return await _back(request, done=f"redelivering {what}: {said}")


def _shown(
    known: Iterable[outbox_sql.Destination], *, full: bool
) -> tuple[Callable[[str], str], Callable[[str | None], str]]:
    """How the page names a destination (by its `name`, as the delivery rows do), and a
    delivery error with any webhook URL in it replaced by that name: the URL itself for
    `full`, else its `label`. A destination removed since the page read the list has
    no label to show."""
    listed = list(known)
    names = {d.name: d.url if full else d.label for d in listed}
    urls = {d.url: names[d.name] for d in listed if d.kind == "webhook"}

    def where(name: str) -> str:
        return names.get(name) or (name if full else "(a removed destination)")

    def scrub(error: str | None) -> str:
        text = error or ""
        for url, shown in urls.items():
            text = text.replace(url, shown)
        return text

    return where, scrub


async def _back(request: Request, **message: str) -> RedirectResponse:
    return await flash.redirect(request, "/ui/events", **message)
