"""No secret in what the console script prints: database URLs with their password masked."""

from __future__ import annotations

import re

# user:password@ in any URL of a message (a driver error may quote the URL it was given).
_PASSWORD_IN_URL = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://[^:/@\s]*):[^@\s]*@", re.I)


def redact(text: str) -> str:
    return _PASSWORD_IN_URL.sub(r"\g<scheme>:***@", text)


def masked(url: str) -> str:
    """A database URL fit to print: its password replaced by ***."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return redact(url)
