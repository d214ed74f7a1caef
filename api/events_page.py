"""The console's order-events page at /ui/events (issue 19): every destination (webhooks
and RabbitMQ) with its backlog and lag, the dead letters, the latest deliveries, and a
Redeliver button per dead letter and for all of them.

Readers see the page; the Redeliver form is shown to, and accepted from, operators and
admins only (`api.access`), with the session's CSRF token like every console form. The
reads and the redelivery are `fsm.subscriptions`' (what `order-saga events list` and
`events redeliver` run): HTTP <-> those calls only.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from api.access import ROUTES
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


@router.get("/events", response_class=HTMLResponse, summary="Order events (operator page)")
def events_page(
    request: Request,
    store: StoreDep,
    done: Annotated[str | None, Query(max_length=300)] = None,
    error: Annotated[str | None, Query(max_length=300)] = None,
) -> HTMLResponse:
    """Destinations with their pending count and lag, dead letters, latest deliveries."""
    now = utcnow()
    backlog = subscriptions.backlog(store)
    destinations = [
        {
            "id": b.destination.id,
            "name": b.destination.name,
            "kind": b.destination.kind,
            "url": b.destination.url,
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
        can_redeliver=ROUTES[REDELIVER].admits(principal_of(request.scope).role),
        done=done,
        error=error,
    )


@router.post("/events/redeliver", summary="Redeliver dead letters")
async def redeliver(
    store: StoreDep,
    _: CsrfChecked,
    event: Annotated[str, Form(max_length=200)] = "",
) -> RedirectResponse:
    """One dead-lettered event (with its order's later dead events, so order holds), or
    `all` of them, back in line for the relay; then back to the page saying how many."""
    event = event.strip()
    if not event:
        return _back(error="say which event to redeliver (or all)")
    try:
        revived = await subscriptions.redeliver_async(store, None if event == ALL else event)
    except ValueError as exc:
        return _back(error=str(exc))
    if revived == 0:
        return _back(error=f"no dead letter {event!r} (delivered or redelivered already?)")
    what = "every dead letter" if event == ALL else event
    plural = "y" if revived == 1 else "ies"
    return _back(done=f"redelivering {what}: {revived} deliver{plural} back in line")


def _back(**message: str) -> RedirectResponse:
    return RedirectResponse(f"/ui/events?{urlencode(message)}", status_code=303)
