"""The console's one-line outcome of an action ("Resume: now completed (completed)", or why
it was refused), carried through the redirect to the page that shows it.

The text rides in the query signed with the deployment's session secret (every `serve`
process reads the same one) and bound to that page, so a link from anywhere else cannot
make the console say something in its own voice (`?error=Your session expired, sign in at
https://evil.example`): a value that is unsigned, altered, stale or meant for another page
shows nothing. No I/O.
"""

from __future__ import annotations

from urllib.parse import urlencode

from fastapi import Request
from fastapi.responses import RedirectResponse
from itsdangerous import BadSignature, URLSafeTimedSerializer

PARAM = "message"
SALT = "order-saga console message"
MAX_AGE = 300  # seconds: read right after the redirect (and by the page's auto-refresh)
KINDS = ("done", "error")


def _signer(request: Request) -> URLSafeTimedSerializer | None:
    sessions = request.app.state.authenticator.sessions
    if sessions is None:  # the deployment's secret is not read yet (database down at start)
        return None
    return URLSafeTimedSerializer(sessions.signer.secret_key, salt=SALT)


def redirect(request: Request, path: str, **message: str) -> RedirectResponse:
    """303 to the page at `path`, with `done=` or `error=` text for it to show."""
    signer = _signer(request)
    if signer is None or not message:
        return RedirectResponse(path, status_code=303)
    signed = signer.dumps({"p": path, **message})
    return RedirectResponse(f"{path}?{urlencode({PARAM: signed})}", status_code=303)


def read(request: Request, value: str | None) -> dict[str, str]:
    """What `redirect` sent this page: {"done": text} or {"error": text}; {} when there is
    nothing, or nothing this deployment signed for this page lately."""
    signer = _signer(request)
    if not value or signer is None:
        return {}
    try:
        data = signer.loads(value, max_age=MAX_AGE)
    except BadSignature:  # SignatureExpired included
        return {}
    if not isinstance(data, dict) or data.get("p") != request.url.path:
        return {}
    return {kind: str(data[kind]) for kind in KINDS if kind in data}
