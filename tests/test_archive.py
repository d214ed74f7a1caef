"""The archive file of `prune` (fsm.archive): opening one to append cuts only a killed
writer's half-written last member and never anything else (another kind of file, a
corrupt member, the intact members after one); a prune whose archive cannot be opened
deletes nothing and says so in one line; `archive show` names a line of the wrong shape
in one line, never a traceback. On SQLite and PostgreSQL for the prune."""

from __future__ import annotations

import gzip
import json
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fsm import archive
from fsm.executor import Executor
from fsm.models import Order, Transition
from fsm.store import Store, utcnow
from order_saga.cli import app
from tests.support.retention import age_into, populate
from tests.support.services import Downstream
from tests.support.settings import saga_env


def two_batches(path: Path) -> bytes:
    appender = archive.Appender(path)
    appender.append([{"order": {"id": "m1"}}])
    appender.append([{"order": {"id": "m2"}}])
    appender.close()
    return path.read_bytes()


def test_a_killed_writer_s_half_member_is_cut_off_and_the_whole_ones_stay(
    tmp_path: Path,
) -> None:
    path = tmp_path / "a.jsonl.gz"
    whole = two_batches(path)
    half = gzip.compress(b'{"order": {"id": "m3"}}\n', mtime=0)
    # Its first byte, two, the header, the data, all but the trailer's end; and the zeros a
    # power cut can leave where an unsynced append was (the delete waits for the fsync).
    tails = [half[:cut] for cut in (1, 2, 3, 10, len(half) - 1)] + [b"\0" * 512, b"\0"]
    for tail in tails:
        path.write_bytes(whole + tail)
        assert [line["order"]["id"] for line in archive.read(path)] == ["m1", "m2"]

        archive.Appender(path).close()

        assert path.read_bytes() == whole, tail


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(
            lambda whole: bytes([*whole[:15], whole[15] ^ 0xFF, *whole[16:]]),
            id="a flipped byte in the first member",
        ),
        pytest.param(lambda whole: whole + b"\x1f\x8bX", id="a bad header after the members"),
        pytest.param(lambda whole: whole + b"\0" * 9 + b"x", id="zeros, then something"),
        pytest.param(lambda whole: whole + b"x", id="one byte after the members"),
        pytest.param(lambda whole: b"junk" + whole, id="bytes before the members"),
    ],
)
def test_an_archive_that_is_not_whole_members_and_a_half_one_is_refused_untouched(
    tmp_path: Path, damage: object
) -> None:
    path = tmp_path / "a.jsonl.gz"
    damaged = damage(two_batches(path))  # type: ignore[operator]
    path.write_bytes(damaged)

    with pytest.raises(archive.ArchiveError, match="refused"):
        archive.Appender(path)

    assert path.read_bytes() == damaged  # not one byte dropped


def test_a_corrupt_member_is_an_error_for_readers_not_the_end_of_the_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "a.jsonl.gz"
    whole = bytearray(two_batches(path))
    whole[15] ^= 0xFF
    path.write_bytes(whole)
    with pytest.raises(archive.ArchiveError, match="corrupt gzip member at byte 0"):
        list(archive.read(path))


def test_a_file_that_is_not_gzip_is_refused_untouched(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("important notes\nline2\n")
    with pytest.raises(archive.ArchiveError, match="notes.txt is not an archive"):
        archive.Appender(notes)
    assert notes.read_text() == "important notes\nline2\n"


async def test_a_prune_whose_archive_is_refused_deletes_nothing(
    db_url: str, store: Store, executor: Executor, downstream: Downstream, tmp_path: Path
) -> None:
    population = await populate(store, executor, downstream, completed=2)
    if db_url.startswith("postgresql"):  # a past day: the partition drop archives first too
        age_into(store, population.eligible, (utcnow() - timedelta(days=3)).date())
    before = {i: (store.get(i), store.history(i)) for i in population.eligible}
    notes = tmp_path / "notes.txt"
    notes.write_text("important notes\nline2\n")
    env = saga_env(database_url=db_url, services_url=downstream.url)

    result = CliRunner().invoke(
        app, ["prune", "--older-than", "0", "--archive", str(notes)], env=env
    )

    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    [line] = result.stderr.splitlines()  # one line, no traceback
    assert line.startswith("order-saga: ") and "notes.txt is not an archive" in line
    assert notes.read_text() == "important notes\nline2\n"
    for order_id, (order, history) in before.items():  # every one still there, whole
        assert store.get(order_id).version == order.version
        assert store.history(order_id) == history


def an_archived_line(order_id: uuid.UUID) -> dict[str, Any]:
    now = utcnow()
    order = Order(
        id=order_id, user_id=1, product_id=1, quantity=1, amount=1999,
        state="completed", status="completed", created_at=now, updated_at=now,
    )  # fmt: skip
    step = Transition(
        order_id=order_id, seq=1, scope="order", trigger="request_product",
        from_state="pending", to_state="product_requested", created_at=now,
    )  # fmt: skip
    return archive.encode(order, [step], archived_at=now)


def spoiled(change: Callable[[dict[str, Any]], Any]) -> Callable[[uuid.UUID], Any]:
    def make(order_id: uuid.UUID) -> Any:
        return change(an_archived_line(order_id))

    return make


def _set(line: dict[str, Any], where: str, key: str, value: Any) -> dict[str, Any]:
    target = line if where == "line" else line["order"] if where == "order" else line[where][0]
    target[key] = value
    return line


@pytest.mark.parametrize(
    ("make", "says"),
    [
        pytest.param(lambda _: [1, 2], "line 2 is not an archived order", id="a list"),
        pytest.param(lambda _: {"order": "x"}, "line 2 is not an archived order",
                     id="order a string"),
        pytest.param(lambda _: "text", "line 2 is not an archived order", id="a string"),
        pytest.param(spoiled(lambda ln: _set(ln, "order", "created_at", "bad")),
                     "line 2: bad value", id="a bad timestamp"),
        pytest.param(spoiled(lambda ln: _set(ln, "order", "created_at", 5)),
                     "line 2: bad value", id="a number for a timestamp"),
        pytest.param(spoiled(lambda ln: _set(ln, "order", "quantity", "one")),
                     "line 2: bad value: quantity", id="a string for a number"),
        pytest.param(spoiled(lambda ln: _set(ln, "order", "bogus", 1)),
                     "line 2: bad value", id="an unknown column"),
        pytest.param(spoiled(lambda ln: _set(ln, "line", "transitions", "x")),
                     'line 2: "transitions" is not a list', id="transitions a string"),
        pytest.param(spoiled(lambda ln: _set(ln, "line", "transitions", [1])),
                     'line 2: "transitions" is not a list', id="a transition a number"),
        pytest.param(spoiled(lambda ln: _set(ln, "transitions", "created_at", None)),
                     "line 2: bad value", id="a transition without its time"),
        pytest.param(spoiled(lambda ln: _set(ln, "transitions", "seq", "1")),
                     "line 2: bad value: seq", id="a string for the seq"),
        pytest.param(spoiled(lambda ln: _set(ln, "line", "format_version", 2)),
                     "line 2: unknown archive format_version 2", id="another version"),
        pytest.param(spoiled(lambda ln: {k: v for k, v in ln.items() if k != "transitions"}),
                     'line 2: "transitions" is not a list', id="no transitions"),
    ],
)  # fmt: skip
def test_archive_show_names_the_line_of_the_wrong_shape_in_one_line(
    tmp_path: Path, make: Callable[[uuid.UUID], Any], says: str
) -> None:
    wanted, other = uuid.uuid4(), uuid.uuid4()
    path = tmp_path / "a.jsonl.gz"
    appender = archive.Appender(path)
    appender.append([an_archived_line(other), make(wanted)])
    appender.close()
    cli = CliRunner()

    result = cli.invoke(app, ["archive", "show", str(path), str(wanted)])

    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    [line] = result.stderr.splitlines()  # one line, no traceback
    assert line.startswith(f"order-saga: {path}: ") and says in line, line
    fine = an_archived_line(wanted)  # the same file with the line put right: shown
    path.write_bytes(gzip.compress(f"{json.dumps(an_archived_line(other))}\n".encode()))
    appender = archive.Appender(path)
    appender.append([fine])
    appender.close()
    shown = cli.invoke(app, ["archive", "show", str(path), str(wanted), "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["id"] == str(wanted)
