"""Cursors of `GET /orders` and `order-saga orders list` that this code never hands out."""

from __future__ import annotations

import base64
import uuid


def hand_made_cursor(raw: str) -> str:
    """A cursor as `fsm.queries` encodes one (base64url of a JSON array), holding `raw`."""
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


_AT = '"2026-01-01T00:00:00"'
_UUID = f'"{uuid.UUID(int=1)}"'
# Cursors this code never hands out. Several got past the old decoding: a float int() cannot
# take (OverflowError), an id uuid.UUID() cannot take (AttributeError), a flag too big for
# SQLite's integers (a 500 or a traceback), a flag other than 0/1, an array too long.
HAND_MADE_CURSORS = {
    "infinite flag": f"[Infinity,{_AT},{_UUID}]",
    "flag 1e400": f"[1e400,{_AT},{_UUID}]",
    "flag too big for sqlite": f"[99999999999999999999999,{_AT},{_UUID}]",
    "flag not 0 or 1": f"[7,{_AT},{_UUID}]",
    "flag true": f"[true,{_AT},{_UUID}]",
    "id a number": f"[0,{_AT},5]",
    "id a list": f"[0,{_AT},[1]]",
    "time a number": f"[0,5,{_UUID}]",
    "an object": '{"a": 1, "b": 2, "c": 3}',
    "four items": f"[0,{_AT},{_UUID},1]",
}
