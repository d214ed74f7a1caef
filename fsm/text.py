"""Text from outside (a service's error detail or reason phrase, an exception's message)
made storable and safe to log, in one function: `fsm.clients` applies it where an error's
text is built, `fsm.store` again before `last_error` is written. It also takes the
credentials out of any URL it quotes (aiohttp's errors quote the whole URL, user:password@
included): what it returns goes to the database, the logs and API clients. No I/O, no
imports of the project: any module may use it.
"""

from __future__ import annotations

import re

# An error's text on the order (`last_error`), in the attempts log and in a log line: long
# enough for any real message, short enough that a 2 MB "detail" costs nothing per attempt.
MAX_ERROR_CHARS = 500

# C0 controls but the tab (a newline would forge a log line; NUL is refused by a
# PostgreSQL text column), DEL, C1 controls, and lone surrogates (not encodable as UTF-8:
# aiohttp decodes a Latin-1 reason phrase with surrogateescape).
_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\ud800-\udfff]")
# A URL's userinfo (`user:password@`, `token@`): from `://` to the authority's last `@`
# (a password may hold an unescaped `@`). Anchored on `://` by a look-behind, so each scan
# stops at the next `/`: linear in the text, whatever a service's detail holds.
# A userinfo holds none of `"<>{}|\^` and backtick either (RFC 3986 leaves them out), so a
# URL quoted in JSON ends at its quote: `"http://svc:8100","contact":"ops@example.com"`
# keeps its text. A `'` may stand in a password (a sub-delim, RFC 3986 §3.2.1).
_USERINFO = re.compile(r"(?<=://)[^/?#\s\"<>{}|\\^`]*@")
MASKED_USERINFO = "***@"
# A secret given as a URL's query parameter (libpq reads `?password=` and `?sslpassword=`;
# an AMQP or webhook URL may carry a token so): its value, up to the next `&`, `#`, `"`,
# space, or a `:` that ends the URL ("cannot migrate URL: error"); a `'` may stand in a
# password, as in a userinfo. Only after a `?` or `&`: "password=" in prose is not taken.
_SECRET_PARAM = re.compile(
    r"(?<=[?&])((?:ssl)?password|passwd|secret|client_secret|token|access_token|api_?key)="
    r"(?:[^&#\s\"<>:]|:(?!\s|$))*",
    re.IGNORECASE,
)


def masked(text: str) -> str:
    """`text` with the whole userinfo of every URL in it (`user:password@`, `token@`, up
    to the authority's last `@`) replaced by `***@`, and the value of a secret query
    parameter (`?password=…`, `&sslpassword=…`, `?token=…`) by `***`: the one mask of a
    URL's credentials, for a URL from the settings (`postgresql://***@db/saga`) as for an
    error's text that quotes one. A text with neither is returned as is."""
    if "://" not in text:
        return text
    if "@" in text:
        text = _USERINFO.sub(MASKED_USERINFO, text)
    if "=" in text:
        text = _SECRET_PARAM.sub(r"\1=***", text)
    return text


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    return "\ufffd" if "\ud800" <= char <= "\udfff" else ascii(char)[1:-1]  # \n, \x00


def storable(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """`text` on one line, every character encodable as UTF-8 and storable in any text
    column (controls escaped as `\\n`, `\\x00`; a lone surrogate as U+FFFD), cut to at
    most `limit` characters plus a trailing "…", the userinfo of every URL in it replaced
    by `***@` (`masked`, before the cut, which could leave half of it). A clean short text is
    returned as is."""
    text = masked(text)
    cut = len(text) > limit
    if cut:
        text = text[:limit]
    if _UNSAFE.search(text):
        text = _UNSAFE.sub(_escaped, text)
        if len(text) > limit:
            text, cut = text[:limit], True
    return f"{text}…" if cut else text
