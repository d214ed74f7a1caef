"""No secret in what the console script prints or logs: database URLs with their password
masked, and the secret values of a logged query string (the access log's) redacted."""

from __future__ import annotations

from urllib.parse import unquote_plus

from fsm.text import without_passwords


def redact(text: str) -> str:
    return without_passwords(text)


def masked(url: str) -> str:
    """A database URL fit to print: its password replaced by ***."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return redact(url)


# Query parameters whose values are credentials: OpenID Connect's callback (`code` trades
# for tokens, `state` guards the flow), and whatever carries a token, a key or a password.
SECRET_PARAMS = frozenset(
    {"code", "state", "token", "key", "access_token", "id_token", "refresh_token"}
    | {"session", "password", "secret", "client_secret", "api_key"}
)
REDACTED = "[redacted]"


def redact_query(target: str) -> str:
    """`target` (a path and its query, as uvicorn logs it) with the value of every
    parameter in SECRET_PARAMS replaced by REDACTED; the rest as it was."""
    path, mark, query = target.partition("?")
    if not mark:
        return target
    pairs = []
    for pair in query.split("&"):
        name, equals, _ = pair.partition("=")
        secret = equals and unquote_plus(name).strip().lower() in SECRET_PARAMS
        pairs.append(f"{name}={REDACTED}" if secret else pair)
    return f"{path}?{'&'.join(pairs)}"
