"""The read pool (`fsm.engine.make_engine`): a connection given back after the pool was
disposed is closed, not left open in the discarded pool until the collector finds it."""

from __future__ import annotations

import threading

from fsm.engine import close_engine, make_engine


def open_(raw: object) -> bool:
    closed = getattr(raw, "closed", None)  # psycopg
    if closed is not None:
        return not closed
    try:
        raw.execute("SELECT 1")  # type: ignore[attr-defined]  # sqlite3: no `closed`
    except Exception:
        return False
    return True


def test_a_read_still_running_when_the_engine_is_disposed_closes_its_connection(
    db_url: str,
) -> None:
    engine = make_engine(db_url)
    checked_out, disposed = threading.Event(), threading.Event()
    seen: list[object] = []

    def read() -> None:  # a read a thread is still doing when the store closes
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
            seen.append(conn.connection.dbapi_connection)
            checked_out.set()
            disposed.wait(10)

    thread = threading.Thread(target=read)
    thread.start()
    assert checked_out.wait(10)
    engine.dispose()
    disposed.set()
    thread.join(10)
    (raw,) = seen
    assert not open_(raw)

    with engine.connect() as conn:  # the engine itself works on, with fresh connections
        assert conn.exec_driver_sql("SELECT 2").scalar() == 2
        kept = conn.connection.dbapi_connection
    assert open_(kept)  # a connection returned to the live pool stays open for reuse
    engine.dispose()


def test_a_read_that_starts_after_the_store_closed_closes_its_connection(db_url: str) -> None:
    """A thread's read queued before the store closed runs after `close_engine`: it works,
    and its connection does not stay behind in the pool (nobody would close it)."""
    engine = make_engine(db_url)
    close_engine(engine)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT 3").scalar() == 3
        raw = conn.connection.dbapi_connection
    assert not open_(raw)
