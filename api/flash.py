"""The console's one-line outcome of an action ("Resume: now completed (completed)", or why
it was refused), carried through the redirect to the page that shows it.

The text rides in the query signed with the deployment's session secret (every `serve`
process reads the same one) and bound to that page and to the session that acted, so a
link from anywhere else cannot make the console say something in its own voice
(`?error=Your session expired, sign in at https://evil.example`), nor can one user's
action mint a message another user's console shows as its own: a value that is unsigned,
altered, stale, meant for another page or made in another session shows nothing.
Signing reads the secret if the process could not at start (the database was down then).
"""

from __future__ import annotations

from urllib.parse import urlencode

from fastapi import Request
from fastapi.responses import RedirectResponse
from itsdangerous import BadSignature, URLSafeTimedSerializer

from api.session import Session

PARAM = "message"
SALT = "order-saga console message"
MAX_AGE = 300  # seconds: read right after the redirect (and by the page's auto-refresh)
KINDS = ("done", "error")


def _signer(request: Request) -> URLSafeTimedSerializer | None:
    sessions = request.app.state.authenticator.sessions
    if sessions is None:  # the deployment's secret is not read yet (database down)
        return None
    return URLSafeTimedSerializer(sessions.signer.secret_key, salt=SALT)


def _session(request: Request) -> str:
    """The id of the console session asking ("" without one: a bearer caller, or the
    console with authentication off, where everyone is the same anonymous admin)."""
    session: Session | None = request.scope.get("session")
    return session.sid if session is not None else ""


async def redirect(request: Request, path: str, **message: str) -> RedirectResponse:
    """303 to the page at `path`, with `done=` or `error=` text for it (and only for this
    session) to show."""
    if message:
        await request.app.state.authenticator.ready()  # secrets not read at start: now
    signer = _signer(request)
    if signer is None or not message:
        return RedirectResponse(path, status_code=303)
    signed = signer.dumps({"p": path, "s": _session(request), **message})
    return RedirectResponse(f"{path}?{urlencode({PARAM: signed})}", status_code=303)


def read(request: Request, value: str | None) -> dict[str, str]:
    """What `redirect` sent this page in this session: {"done": text} or {"error": text};
    {} when there is nothing, or nothing this deployment signed for this page and this
    session lately."""
    signer = _signer(request)
    if not value or signer is None:
        return {}
    try:
        data = signer.loads(value, max_age=MAX_AGE)
    except BadSignature:  # SignatureExpired included
        return {}
    if not isinstance(data, dict) or data.get("p") != request.url.path:
        return {}
    if data.get("s") != _session(request):  # another user's, or another session's
        return {}
    return {kind: str(data[kind]) for kind in KINDS if kind in data}
