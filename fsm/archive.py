"""The archive of pruned orders: gzip JSON lines, one line per order with its whole
transition log, written and fsynced before the rows are deleted (`fsm.retention`).
No SQL, no decisions about what to prune: encoding, appending, reading back.

Format (version 1), one JSON object per line:

    {"format_version": 1, "archived_at": "<UTC ISO 8601>",
     "order": {<every column of `orders`, timestamps ISO 8601, id a UUID string>},
     "transitions": [{"seq", "scope", "trigger", "from_state", "to_state",
                      "created_at", "detail", "machine_version"}, ...]}   # by seq

A file is a sequence of gzip members, one per batch (`gzip -dc FILE` reads it whole). A
writer killed mid-batch leaves a truncated last member: its orders were not deleted (the
delete waits for the fsync), readers ignore it and the next append cuts it off first.
Nothing else is cut: a file that is not whole members plus such a tail (another kind of
file, a corrupt member, bytes after one) is refused by the appender, untouched, and is an
error for readers: its bytes may be the last copy of orders already deleted. An
order that changed between being archived and the delete's check stays in the database and
is archived again by a later prune: the last line of an id is the one that counts.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import uuid
import zlib
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from fsm.errors import CorruptOrder
from fsm.models import Order, Transition

FORMAT_VERSION = 1
_TIMESTAMPS = ("lease_expires_at", "next_attempt_at", "deadline_at", "created_at", "updated_at")
_TRANSITION_FIELDS = (
    "seq",
    "scope",
    "trigger",
    "from_state",
    "to_state",
    "created_at",
    "detail",
    "machine_version",
)


# Every member starts so: magic, deflate (RFC 1952). A tail starting otherwise is not one.
_GZIP_HEADER = b"\x1f\x8b\x08"


class ArchiveError(Exception):
    """An archive file that cannot be read or a line of an unknown format."""


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()


def _time(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def encode(order: Order, history: Iterable[Transition], *, archived_at: datetime) -> dict[str, Any]:
    """One archive line (as a dict) for an order and its transition log."""
    body = {f.name: getattr(order, f.name) for f in dataclasses.fields(Order)}
    body["id"] = str(order.id)
    for key in _TIMESTAMPS:
        body[key] = _iso(body[key])
    lines = [
        {
            **{name: getattr(t, name) for name in _TRANSITION_FIELDS},
            "created_at": _iso(t.created_at),
        }
        for t in sorted(history, key=lambda t: t.seq)
    ]
    return {
        "format_version": FORMAT_VERSION,
        "archived_at": _iso(archived_at),
        "order": body,
        "transitions": lines,
    }


def decode(line: Any) -> tuple[Order, list[Transition]]:
    """The order and its log back from one archive line; ArchiveError for another format
    or a line of the wrong shape (what a bad value would raise included)."""
    if not isinstance(line, dict):
        raise ArchiveError(f"not an archive line (a JSON {type(line).__name__})")
    if line.get("format_version") != FORMAT_VERSION:
        raise ArchiveError(f"unknown archive format_version {line.get('format_version')!r}")
    body, lines = line.get("order"), line.get("transitions")
    if not isinstance(body, dict):
        raise ArchiveError('"order" is not an object')
    if not isinstance(lines, list) or not all(isinstance(t, dict) for t in lines):
        raise ArchiveError('"transitions" is not a list of objects')
    try:
        data = dict(body)
        data["id"] = uuid.UUID(data["id"])
        for key in _TIMESTAMPS:
            data[key] = _time(data[key])
        order = Order(**data)
        history = [
            Transition(order_id=order.id, **{**t, "created_at": _time(t["created_at"])})
            for t in lines
        ]
        _check_types(order)
        for t in history:
            _check_types(t)
    except KeyError as exc:
        raise ArchiveError(f"missing field {exc}") from exc
    except (ValueError, TypeError, AttributeError, CorruptOrder) as exc:
        raise ArchiveError(f"bad value: {exc}") from exc
    return order, history


_KINDS: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "bool": (bool,),
    "datetime": (datetime,),
    "uuid.UUID": (uuid.UUID,),
    "dict[str, int]": (dict,),
    "dict[str, Any]": (dict,),
}


def _check_types(item: Order | Transition) -> None:
    """TypeError naming the first field whose value is not of its declared type (what a
    printer of the order would otherwise trip over)."""
    for f in dataclasses.fields(item):
        declared = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        optional = declared.endswith(" | None")
        kinds = _KINDS.get(declared.removesuffix(" | None"))
        value = getattr(item, f.name)
        if kinds is None or (optional and value is None):
            continue
        if not isinstance(value, kinds) or (kinds == (int,) and isinstance(value, bool)):
            raise TypeError(f"{f.name} is {value!r}, not {declared}")


# -- files ---------------------------------------------------------------------------------


class _Corrupt(Exception):
    """A gzip member that zlib refuses (bad header, bad data, wrong CRC or length)."""

    def __init__(self, offset: int, reason: str) -> None:
        super().__init__(f"corrupt gzip member at byte {offset}: {reason}")
        self.offset = offset


def _members(raw: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """(end offset, data) of every complete gzip member, from the start of `raw`. Stops
    quietly at a truncated last member (every byte of it accepted, then the end of the
    file: what a killed writer leaves); raises _Corrupt at a member zlib refuses (it checks
    each member's header, data, CRC and length), whatever follows it."""
    offset = 0
    pending = b""
    while True:
        inflater = zlib.decompressobj(wbits=31)
        out: list[bytes] = []
        used = 0
        data = pending
        pending = b""
        while True:
            if not data:
                data = raw.read(1 << 20)
                if not data:
                    return  # end of file: no member, or a truncated one
            try:
                out.append(inflater.decompress(data))
            except zlib.error as exc:
                if not out and _zeros_to_the_end(data, raw):
                    return  # a tail a power cut left zeroed: an unsynced member, never whole
                raise _Corrupt(offset, str(exc)) from exc
            if inflater.eof:
                pending = inflater.unused_data
                used += len(data) - len(pending)
                break
            used += len(data)
            data = b""
        offset += used
        yield offset, b"".join(out)


def _zeros_to_the_end(data: bytes, raw: BinaryIO) -> bool:
    """Are `data` and the rest of `raw` all NUL bytes?"""
    while data:
        if data.strip(b"\0"):
            return False
        data = raw.read(1 << 20)
    return True


def _lines(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) of every line of a file, in the order written."""
    number = 0
    try:
        with open(path, "rb") as raw:
            for _, data in _members(raw):
                for text in data.splitlines():
                    number += 1
                    if not text.strip():
                        continue
                    try:
                        parsed = json.loads(text)
                    except ValueError as exc:
                        raise ArchiveError(f"line {number} is not JSON: {exc}") from exc
                    yield number, parsed
    except (OSError, _Corrupt) as exc:
        raise ArchiveError(f"cannot read archive {path}: {exc}") from exc


def read(path: str | Path) -> Iterator[dict[str, Any]]:
    """Every archived line of a file, in the order written; a truncated last member is
    ignored, a corrupt member is an ArchiveError (what follows it cannot be read)."""
    for _, line in _lines(path):
        yield line


def find(path: str | Path, order_id: uuid.UUID) -> tuple[Order, list[Transition]] | None:
    """The last archived copy of one order in a file, or None. A line that is not an
    archived order is an ArchiveError naming its line number."""
    wanted, found, at = str(order_id), None, 0
    for number, line in _lines(path):
        order = line.get("order") if isinstance(line, dict) else None
        if not isinstance(order, dict):
            raise ArchiveError(f"line {number} is not an archived order")
        if order.get("id") == wanted:
            found, at = line, number
    if found is None:
        return None
    try:
        return decode(found)
    except ArchiveError as exc:
        raise ArchiveError(f"line {at}: {exc}") from exc


class Appender:
    """Appends one gzip member per batch and fsyncs it (and, for a new file, its folder)
    before `append` returns. A truncated last member a killed writer left (a gzip header,
    every byte accepted, then the end of the file) is cut off first; anything else that is
    not whole gzip members (another kind of file, a corrupt member, bytes after one) is an
    ArchiveError and the file is left exactly as it was: its bytes may be the last copy of
    orders already deleted."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        created = not self.path.exists()
        try:
            self._raw = open(self.path, "ab+")  # noqa: SIM115  (closed by close())
        except OSError as exc:
            raise ArchiveError(f"cannot open archive {self.path}: {exc}") from exc
        try:
            self._cut_partial_tail()
            if created:
                _fsync_dir(self.path.parent)
        except BaseException:
            self._raw.close()
            raise

    def _cut_partial_tail(self) -> None:
        self._raw.seek(0)
        end = 0
        try:
            for member_end, _ in _members(self._raw):
                end = member_end
        except _Corrupt as exc:
            raise ArchiveError(
                f"{self.path} is not an archive to append to ({exc}); "
                "refused: the file left as it was, nothing pruned"
            ) from exc
        size = self._raw.seek(0, os.SEEK_END)
        if size == end:
            return
        self._raw.seek(end)
        head = self._raw.read(len(_GZIP_HEADER))
        # What `_members` stops quietly at: a member's start cut anywhere (its header whole
        # or not), or zeros to the end of the file.
        if not (head.startswith(_GZIP_HEADER[: len(head)]) or not head.strip(b"\0")):
            raise ArchiveError(
                f"{self.path} ends with {size - end} bytes that are not a gzip member; "
                "refused: the file left as it was, nothing pruned"
            )
        self._raw.truncate(end)  # a killed writer's half member: its orders were not deleted
        os.fsync(self._raw.fileno())

    def append(self, lines: Iterable[dict[str, Any]]) -> int:
        # Keys in their logged order (not sorted): `archive show` prints details as logged.
        payload = b"".join(
            json.dumps(line, separators=(",", ":")).encode() + b"\n" for line in lines
        )
        if not payload:
            return 0
        self._raw.write(gzip.compress(payload, mtime=0))
        self._raw.flush()
        os.fsync(self._raw.fileno())
        return len(payload)

    def close(self) -> None:
        self._raw.close()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
