"""No secret in what the console script prints or logs: in the access log the values of
secret query parameters (by name) and any value in the format of one of our secrets,
wherever it stands (by shape) redacted. A URL's credentials are masked by
`fsm.text.masked` (database URLs, error lines), the one mask of a userinfo."""

from __future__ import annotations

import re
import string
from urllib.parse import unquote_plus

# Query parameters whose values are credentials: OpenID Connect's callback (`code` trades
# for tokens, `state` guards the flow), and whatever carries a token, a key or a password.
SECRET_PARAMS = frozenset(
    {"code", "state", "token", "key", "access_token", "id_token", "refresh_token"}
    | {"session", "password", "secret", "client_secret", "api_key", "apikey", "auth"}
)
REDACTED = "[redacted]"

# Our secrets by their shape (a name can be anything, a path has none): a key (fsm.keys:
# `osk_` + 43 url-safe base64 characters), the internal token (`osi_` + 64 hex digits), a
# webhook's signing secret (fsm.destinations.webhook: `whsec_` + base64, 32 characters
# for ours, Standard Webhooks allows up to 64 bytes). Each character may come
# percent-encoded, the escape itself encoded again (a URL inside a parameter: ?next=).
_ESCAPE = r"%(?:25)*"


def _literal(text: str) -> str:
    """A regex of `text` with each character as itself or percent-encoded."""

    def one(c: str) -> str:
        code = f"{ord(c):02X}"  # its first hex digit is a digit for these characters
        return f"(?:{re.escape(c)}|{_ESCAPE}{code[0]}[{code[1]}{code[1].lower()}])"

    return "".join(map(one, text))


def _unit(chars: str) -> str:
    """A regex of one of `chars`, as itself or percent-encoded (an escape of any other
    character ends the secret: `%26` in `?next=/ui%3Fkey%3Dosk_…%26status%3D…`)."""
    seconds: dict[str, set[str]] = {}
    for c in chars:
        code = f"{ord(c):02X}"
        seconds.setdefault(code[0], set()).update((code[1], code[1].lower()))
    escapes = "|".join(f"{first}[{''.join(sorted(s))}]" for first, s in sorted(seconds.items()))
    return f"(?:[{re.escape(chars)}]|{_ESCAPE}(?:{escapes}))"


_URL_SAFE = string.ascii_letters + string.digits + "_-"


_SECRET_SHAPES = re.compile(
    "|".join(
        f"{_literal(prefix)}{_unit(chars)}{{{count}}}"
        for prefix, chars, count in (
            ("osk_", _URL_SAFE, "43,"),
            ("osi_", string.hexdigits, "64,"),
            ("whsec_", string.ascii_letters + string.digits + "+/=", "16,88"),
        )
    )
)


def redact_secrets(text: str) -> str:
    """`text` with every value shaped like one of our secrets replaced by REDACTED."""
    if "%" not in text and "sk_" not in text and "osi_" not in text and "whsec" not in text:
        return text  # the common line: nothing that could be one
    return _SECRET_SHAPES.sub(REDACTED, text)


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
