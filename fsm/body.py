"""An answer's body as a transport reads it: decoded per its Content-Encoding (gzip,
deflate) here, never by the HTTP library, and at most `MAX_BODY` bytes once decoded.

`fsm.clients`' transports feed it chunk by chunk and stop once it is `too_large` (its
data dropped: the status alone then classifies the answer, and a 2xx is unreadable); a
body in an encoding not asked for, or that does not decompress, raises
`TransientFailure` (an unreadable answer: the effect is unknown). No I/O of its own.
"""

from __future__ import annotations

import zlib

from fsm.errors import TransientFailure

# A service's JSON answer is a few hundred bytes; 1 MiB is far above any real one and
# small enough that a gzip bomb (30 KB on the wire, 30 MB decoded) or a 2 MB error detail
# costs neither memory nor a huge transition row.
MAX_BODY = 1 << 20

# What the transports send as Accept-Encoding: what `Body` decodes, nothing else.
ACCEPTED_ENCODINGS = "gzip, deflate"

_INFLATED = frozenset({"gzip", "x-gzip", "deflate"})
_PLAIN = frozenset({"", "identity"})


class Body:
    """Collect one answer's body; `feed` each chunk off the wire, then read `data`."""

    def __init__(self, encoding: str, limit: int = MAX_BODY) -> None:
        name = encoding.strip().lower()
        if name not in _PLAIN and name not in _INFLATED:
            raise TransientFailure(f"unreadable body: Content-Encoding {name[:40]!r}")
        # wbits 47: a zlib or a gzip header, detected (servers label deflate either way).
        self.inflate = zlib.decompressobj(wbits=47) if name in _INFLATED else None
        self.limit = limit
        self.data = bytearray()
        self.too_large = False

    def feed(self, chunk: bytes) -> None:
        """Add one chunk off the wire; past the bound, set `too_large` and keep nothing."""
        if self.inflate is None:
            self.data += chunk
        else:
            try:
                while chunk and len(self.data) <= self.limit:
                    # Never more output than the bound leaves: a bomb stops within a byte.
                    room = self.limit + 1 - len(self.data)
                    self.data += self.inflate.decompress(chunk, room)
                    chunk = self.inflate.unconsumed_tail
            except zlib.error as exc:
                raise TransientFailure(f"unreadable body: {exc}") from exc
        if len(self.data) > self.limit:
            self.too_large, self.data = True, bytearray()
