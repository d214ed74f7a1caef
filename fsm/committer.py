"""Group commit: one writer thread per process, through which every write of the engine goes.

Writes that arrive while a transaction is being committed are written together in the
next one, so N orders in flight share one commit (one fsync on PostgreSQL) instead of
queueing behind N. Each caller continues only once the transaction holding *its* write has
committed: intent-before-effect (SPEC §3) holds per order exactly as with one commit per
write. A write that finds the queue empty is committed at once, unless `company` says
many other orders of this process are in flight: then the writer lingers (at most `linger`
seconds, see `_gather`) for their writes to join the batch.

A write is an `Op`: a function of a DBAPI cursor, run inside the batch's transaction. An op
refuses by raising a `SagaError` (stale version, lost lease) *before it has written
anything*; that fails this op alone, its batch neighbours commit. An op may be a generator
that yields once, after sending its statements and before reading their results: on
PostgreSQL the statements of a batch of such ops are then sent together (pipeline mode,
one round trip per batch instead of one per statement), and each op is resumed to read its
results once they have all arrived. An op the database rejects (a lock timeout, a
constraint) aborts the transaction; the batch is committed again without it, so it fails
alone too. The thread owns its connection (reconnecting once when
it is lost); the event loop never touches the database. A batch whose connection was lost
is run again on the new one, though its first run may have committed with only the
answer lost: a write that cannot tell its own committed row from another writer's gives
`after_loss`, the op run instead on such a retry (it counts its own write as done).

    committer.submit(op)  -> awaitable (from the event loop)
    committer.call(op)    -> result    (from a plain thread: the CLI, tests)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Generator, Sized
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, TypeVar, overload

from fsm.errors import SagaError, StoreUnavailable

log = logging.getLogger("order_saga.committer")

T = TypeVar("T")
Op = Callable[[Any], T]  # a function of a DBAPI cursor


@dataclass(frozen=True)
class Backend:
    """How the thread talks to one database (built by `fsm.engine`)."""

    connect: Callable[[], Any]  # -> a DBAPI connection, ready to use
    begin: str | None  # statement opening a write transaction (SQLite: BEGIN IMMEDIATE)
    errors: tuple[type[BaseException], ...]  # the driver's database errors
    translate: Callable[[BaseException], BaseException]  # driver error -> what callers see
    broken: Callable[[Any], bool]  # is this connection unusable (disconnected)?
    close: Callable[[Any], None]
    # conn -> a context in which statements are sent without waiting for their results,
    # all of them read at its exit (psycopg's pipeline mode); None: one at a time.
    pipeline: Callable[[Any], AbstractContextManager[Any]] | None = None
    # (conn, seconds) -> the longest the next BEGIN may wait for another writer's lock
    # (SQLite's busy timeout); with `busy`, telling that wait's expiry from other errors.
    # None: the database bounds its own waits per statement (PostgreSQL's lock_timeout).
    bound_wait: Callable[[Any, float], None] | None = None
    busy: Callable[[BaseException], bool] = lambda exc: False
    # Row locks (PostgreSQL). The batch connection waits only briefly for a row another
    # session holds (`row_locked` tells that error); the op is then moved to the side lane,
    # a second writer thread on `side` (its own connection, the full lock timeout, bounded
    # by the op's own deadline), so one locked row costs only its own order's writes.
    row_locked: Callable[[BaseException], bool] = lambda exc: False
    side: Backend | None = None


class _Item(Generic[T]):
    __slots__ = ("op", "loop", "future", "deadline", "key", "after", "after_loss")

    def __init__(
        self,
        op: Op[T],
        loop: asyncio.AbstractEventLoop | None,
        future: asyncio.Future[T] | concurrent.futures.Future[T],
        key: Any = None,
        after_loss: Op[T] | None = None,
    ) -> None:
        self.op, self.loop, self.future, self.key = op, loop, future, key
        self.after_loss = after_loss  # run instead of `op` when its batch is retried
        self.deadline = 0.0  # monotonic: when waiting for a lock must give up (set at _put)
        self.after: Callable[[], None] | None = None  # run once delivered (the side lane)


_MOVED = (False, None)  # a result slot whose op went to the side lane (delivered there)


_STOP = object()
# How often a lingering writer looks for the writes that arrived meanwhile (seconds).
LINGER_TICK = 0.002


class _OpError(Exception):
    """The database rejected the op at `position` (the transaction is rolled back)."""

    def __init__(self, position: int, error: Exception) -> None:
        super().__init__(str(error))
        self.position, self.error = position, error


class Committer:
    def __init__(
        self,
        backend: Backend,
        *,
        max_batch: int = 256,
        lock_timeout: float = 5.0,
        linger: float = 0.0,
    ) -> None:
        self.backend = backend
        self.max_batch = max_batch
        # Group commit shares a commit among the writes queued while the previous one ran;
        # a process with little load (one of `serve --workers N`) finds few, and each
        # commit costs the writer, the event loop's wake-up and a round trip. `company`
        # (the orders this process drives now: fsm.wiring sets it) and `linger` (seconds)
        # let a small batch wait briefly for the writes of the orders in flight.
        self.linger = linger
        self.company: Sized = ()
        self.lingered = 0  # batches that waited for company (tests)
        self.lock_timeout = lock_timeout  # the longest a write waits for a lock, queue included
        # The last transaction's database error, None once a transaction holding a write
        # (not only probes) commits: /healthz and /readyz read it (fsm.health).
        self.last_error: BaseException | None = None
        # Did it fail writing (a statement or the commit: disk full, read-only), rather than
        # getting in (connect, BEGIN: refused, locked)? Only a real write clears the former.
        self._failed_writing = False
        self._writing = False
        self.batches = 0  # committed transactions (read by tests and /metrics)
        self.ops = 0
        self.largest_batch = 0
        self.in_flight = 0  # writes in the transaction under way (0: waiting for work)
        # The side lane for ops that met a row lock, and the keys (orders) with ops there:
        # a later op of such an order follows it there, so one order's writes stay in order.
        self.side = (
            Committer(backend.side, max_batch=1, lock_timeout=lock_timeout)
            if backend.side is not None
            else None
        )
        self.moved: Counter[Any] = Counter()  # ops moved to the side lane, by key (tests)
        self._aside: Counter[Any] = Counter()
        self._aside_lock = threading.Lock()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._conn: Any = None

    # -- callers ---------------------------------------------------------------------

    @overload
    def submit(
        self,
        op: Callable[[Any], Generator[None, None, T]],
        *,
        key: Any = None,
        after_loss: Callable[[Any], Generator[None, None, T]] | None = None,
    ) -> asyncio.Future[T]: ...
    @overload
    def submit(
        self, op: Op[T], *, key: Any = None, after_loss: Op[T] | None = None
    ) -> asyncio.Future[T]: ...
    def submit(
        self, op: Op[Any], *, key: Any = None, after_loss: Op[Any] | None = None
    ) -> asyncio.Future[Any]:
        """Queue `op`; the future resolves once its transaction has committed. `key` (an
        order id) names the row the op writes: ops of one key commit in submission order.
        `after_loss`: what to run instead of `op` if the connection is lost during its
        batch and the batch is run again (the first run may have committed)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._put(_Item(op, loop, future, key, after_loss))
        return future

    @overload
    def call(self, op: Callable[[Any], Generator[None, None, T]]) -> T: ...
    @overload
    def call(self, op: Op[T]) -> T: ...
    def call(self, op: Op[Any]) -> Any:
        """Queue `op` and block this (non-event-loop) thread until it has committed."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._put(_Item(op, None, future))
        return future.result()

    def _put(self, item: _Item[Any]) -> None:
        item.deadline = item.deadline or time.monotonic() + self.lock_timeout
        # Under the lock that `close` holds until its writer has stopped: a write is queued
        # for a running writer (never behind its _STOP, where nobody would take it), and a
        # new writer starts only once the old one is gone (two on one queue: either could
        # take the _STOP, the other would run on, and one order's writes would race).
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._serve, name="order-saga-commit", daemon=True
                )
                self._thread.start()
            self._queue.put(item)

    def close(self) -> None:
        """Commit what is queued, then stop the thread and close its connection. A write
        submitted meanwhile waits, then starts a writer of its own (a store used again)."""
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is not None:
                self._queue.put(_STOP)
                thread.join()
        if self.side is not None:
            self.side.close()

    def _move(self, item: _Item[Any]) -> None:
        """Hand `item` to the side lane (the caller keeps waiting on the same future)."""
        assert self.side is not None
        with self._aside_lock:
            self._aside[item.key] += 1
            self.moved[item.key] += 1

        def back() -> None:
            with self._aside_lock:
                self._aside[item.key] -= 1
                if self._aside[item.key] <= 0:
                    del self._aside[item.key]

        item.after = back
        self.side._put(item)

    def _follows_aside(self, item: _Item[Any]) -> bool:
        if item.key is None or not self._aside:
            return False
        with self._aside_lock:
            return item.key in self._aside

    # -- the writer thread -----------------------------------------------------------

    def _serve(self) -> None:
        try:
            while True:
                first = self._queue.get()
                if first is _STOP:
                    return
                batch = [first]
                stopping = self._drain(batch)
                if self.linger > 0 and not stopping and len(batch) < self.max_batch:
                    stopping = self._gather(batch)
                for item in [i for i in batch if self._follows_aside(i)]:
                    batch.remove(item)  # its order has a write in the side lane: after it
                    self._move(item)
                if not batch:
                    if stopping:
                        return
                    continue
                try:
                    results = self._commit(batch)
                except BaseException as fatal:  # even then, nobody is left waiting
                    results = [(False, fatal)] * len(batch)
                    log.exception("commit thread: unexpected failure")
                self._deliver(batch, results)
                if stopping:
                    return
        finally:
            if self._conn is not None:
                self.backend.close(self._conn)
                self._conn = None

    def _drain(self, batch: list[_Item[Any]]) -> bool:
        """Add what is queued to `batch`, up to `max_batch`, without waiting. True if
        `_STOP` came."""
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return False
            if item is _STOP:
                return True
            batch.append(item)
        return False

    def _gather(self, batch: list[_Item[Any]]) -> bool:
        """Wait up to `linger` for more writes while fewer than half of the orders in
        flight (`company`) have one in `batch`: they are between two writes (a service
        call) and most write again within a few milliseconds, into this commit instead of
        one each. A batch with no order's write (a probe, the relay), or one holding half
        the orders already, goes at once; so does every write of a process driving one or
        two orders (nobody to wait for). Each write still commits before its caller goes
        on (SPEC §3): lingering only delays it. True if `_STOP` came meanwhile.

        The writer sleeps in ticks of at most `LINGER_TICK` and takes what arrived at each:
        woken by every write instead (a blocking `get`), it cost a wake-up of this thread,
        a hand-over of the GIL and a futex call on the event loop per write, which made
        two `serve` processes spend ~7 % more CPU per order (BENCHMARKS.md, issue 20)."""
        keys = {item.key for item in batch if item.key is not None}
        if not keys or 2 * len(keys) >= len(self.company):
            return False
        self.lingered += 1
        until = time.monotonic() + self.linger
        while (left := until - time.monotonic()) > 0:
            time.sleep(min(left, LINGER_TICK))
            seen = len(batch)
            if self._drain(batch):
                return True
            keys.update(item.key for item in batch[seen:] if item.key is not None)
            if 2 * len(keys) >= len(self.company) or len(batch) >= self.max_batch:
                break
        return False

    def _commit(self, batch: list[_Item[Any]]) -> list[tuple[bool, Any]]:
        """Commit the batch; an op the database rejects fails alone and the rest are
        committed without it. A failure to begin or commit fails the whole batch (the
        database is locked, down or out of space: retrying each write would only make
        every caller wait again), after one reconnect if the connection was lost.

        Waiting for another writer's lock (SQLite) is bounded by the oldest write's own
        deadline, `lock_timeout` after it was submitted: a write queued behind a batch that
        waited in vain is not made to wait a second full timeout of its own (the documented
        5 s were ~10 s). When the wait expires, the writes whose time is up fail; the
        others try again for what is left of theirs."""
        results: list[tuple[bool, Any] | None] = [None] * len(batch)
        pending = list(range(len(batch)))
        reconnected = False
        while pending:
            wait = None
            if self.backend.bound_wait is not None:
                wait = max(0.0, batch[pending[0]].deadline - time.monotonic())
            if reconnected:  # the lost run may have committed: ops that can tell, check
                ops = [_after_loss(batch[i]) for i in pending]
            else:
                ops = [batch[i].op for i in pending]
            try:
                done = self._transaction(ops, wait=wait)
            except _OpError as rejected:
                if self.side is not None and self.backend.row_locked(rejected.error):
                    self._discard(rejected.error)
                    culprit = batch[pending[rejected.position]].key
                    # It, and its order's later ops in this batch, wait in the side lane.
                    aside = [
                        i
                        for n, i in enumerate(pending)
                        if n == rejected.position
                        or (
                            culprit is not None
                            and n > rejected.position
                            and batch[i].key == culprit
                        )
                    ]
                    for i in aside:
                        self._move(batch[i])
                        results[i] = _MOVED
                    pending = [i for i in pending if i not in aside]
                    continue
                lost = self._discard(rejected.error)
                failure = self._translate(rejected.error)
                if isinstance(failure, StoreUnavailable):  # disk full, server gone: not the op's
                    self.last_error, self._failed_writing = failure, not lost
                results[pending.pop(rejected.position)] = (False, failure)
                continue
            except Exception as exc:
                failure = self._translate(exc)
                if isinstance(exc, self.backend.errors):
                    self.last_error, self._failed_writing = failure, self._writing
                lost = self._discard(exc)
                if lost and not reconnected:
                    reconnected = True
                    continue
                if wait is not None and self.backend.busy(exc):
                    now = time.monotonic() + 0.01
                    expired = [i for i in pending if batch[i].deadline <= now] or pending[:1]
                    for i in expired:
                        results[i] = (False, failure)
                    pending = [i for i in pending if i not in expired]
                    continue
                for i in pending:
                    results[i] = (False, failure)
                break
            for i, result in zip(pending, done, strict=True):
                results[i] = result
            break
        return [r if r is not None else _MOVED for r in results]

    def _translate(self, exc: Exception) -> BaseException:
        if isinstance(exc, self.backend.errors):
            return self.backend.translate(exc)
        return exc  # a bug in an op: the caller sees it as it is

    def _transaction(
        self, ops: list[Op[Any]], *, wait: float | None = None
    ) -> list[tuple[bool, Any]]:
        """Run `ops` in one transaction; a SagaError refuses one op, the rest go on."""
        self._writing = False
        if self._conn is None:
            self._conn = self.backend.connect()
        conn = self._conn
        self.in_flight = len(ops)
        try:
            if wait is not None and self.backend.bound_wait is not None:
                self.backend.bound_wait(conn, wait)
            if self.backend.begin:
                conn.execute(self.backend.begin)
            self._writing = True
            results = None
            if self.backend.pipeline is not None and len(ops) > 1 and all(map(_yields, ops)):
                results = self._pipelined(conn, ops)
                if results is None and self.backend.begin:  # rolled back: open another
                    conn.execute(self.backend.begin)
            if results is None:
                results = [self._step(position, op, conn) for position, op in enumerate(ops)]
            conn.commit()
        except BaseException:
            _rollback(conn)
            raise
        finally:
            self.in_flight = 0
        if not self._failed_writing or not all(getattr(op, "probe", False) for op in ops):
            self.last_error = None  # in again; a failure to write needs a real write
        self.batches += 1
        self.ops += len(ops)
        self.largest_batch = max(self.largest_batch, len(ops))
        return results

    @staticmethod
    def _step(position: int, op: Op[Any], conn: Any) -> tuple[bool, Any]:
        """Run one op to its end (a generator op straight through its yield)."""
        try:
            out = op(conn.cursor())
            return True, _finish(out) if inspect.isgenerator(out) else out
        except SagaError as refused:
            return False, refused
        except Exception as error:
            raise _OpError(position, error) from error

    def _pipelined(self, conn: Any, ops: list[Op[Any]]) -> list[tuple[bool, Any]] | None:
        """Send every op's statements, then read: one round trip for the batch. None when
        the database rejected a statement: which one is not known, so the caller rolls
        back and runs the batch one statement at a time, where the culprit fails alone."""
        assert self.backend.pipeline is not None
        sent: list[Any] = []
        try:
            with self.backend.pipeline(conn):
                for op in ops:
                    gen = op(conn.cursor())
                    try:
                        next(gen)
                    except StopIteration as early:  # answered without the database
                        gen = (True, early.value)
                    except SagaError as refused:
                        gen = (False, refused)
                    sent.append(gen)
        except self.backend.errors:
            for gen in sent:
                if inspect.isgenerator(gen):
                    gen.close()
            _rollback(conn)
            if self.backend.broken(conn):
                raise
            return None
        results: list[tuple[bool, Any]] = []
        for position, gen in enumerate(sent):
            if not inspect.isgenerator(gen):
                results.append(gen)
                continue
            try:
                results.append((True, _finish(gen, started=True)))
            except SagaError as refused:
                results.append((False, refused))
            except Exception as error:
                raise _OpError(position, error) from error
        return results

    def _discard(self, exc: BaseException) -> bool:
        """After a failed transaction: drop a broken connection (the next batch reconnects).
        True if it was lost."""
        if self._conn is None or not self.backend.broken(self._conn):
            return False
        log.warning("database connection lost (%s); reconnecting", exc)
        self.backend.close(self._conn)
        self._conn = None
        return True

    @staticmethod
    def _deliver(batch: list[_Item[Any]], results: list[tuple[bool, Any]]) -> None:
        """Hand results back: one wake-up per event loop, not one per write."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Any, bool, Any]]] = {}
        for item, result in zip(batch, results, strict=True):
            if result is _MOVED:
                continue  # the side lane answers it
            if item.after is not None:
                item.after()
            ok, value = result
            if item.loop is None:
                sync_future: concurrent.futures.Future[Any] = item.future  # type: ignore[assignment]
                if ok:
                    sync_future.set_result(value)
                else:
                    sync_future.set_exception(value)
            else:
                by_loop.setdefault(item.loop, []).append((item.future, ok, value))
        for loop, pending in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, pending)
            except RuntimeError:  # that loop is closed: nobody is waiting any more
                pass


async def settled(future: asyncio.Future[T]) -> T:
    """Await a submitted write to its end even if the awaiting task is cancelled meanwhile.

    A queued op commits (or fails) whether or not anyone still waits for it, so a caller
    cancelled mid-write (SIGTERM) must not guess: it learns the outcome first and then
    sees its cancellation (the wait is short, and bounded by the op's lock timeout).
    The task awaits a waiter of its own, woken by the write's future: cancelling the task
    cancels the waiter, never the write (`asyncio.wait([future])` did the same with a set,
    two coroutines and more callbacks, per write: ~2x the CPU)."""
    cancelled: asyncio.CancelledError | None = None
    while not future.done():
        waiter = future.get_loop().create_future()
        wake = partial(_wake, waiter)
        future.add_done_callback(wake)
        try:
            await waiter
        except asyncio.CancelledError as exc:
            cancelled = exc
            future.remove_done_callback(wake)
    if cancelled is not None:
        raise cancelled
    return future.result()


def _wake(waiter: asyncio.Future[None], _: object) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _resolve(pending: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for future, ok, value in pending:
        if future.done():  # the caller was cancelled; the write stands
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


def _after_loss(item: _Item[Any]) -> Op[Any]:
    """The op to run again once its batch's connection was lost (the first run may have
    committed, unheard): its `after_loss` if it has one."""
    return item.after_loss if item.after_loss is not None else item.op


def _yields(op: Op[Any]) -> bool:
    """Is `op` a generator function (a partial of one included)?"""
    return inspect.isgeneratorfunction(op)


def _finish(gen: Any, *, started: bool = False) -> Any:
    """Run a generator op from (or past) its one yield to its return value."""
    try:
        if not started:
            next(gen)
        next(gen)
    except StopIteration as done:
        return done.value
    raise RuntimeError(f"{gen!r}: an op yields once, between sending and reading")


def _rollback(conn: Any) -> None:
    try:
        conn.rollback()
    except Exception:  # a broken connection cannot roll back; it is replaced
        pass
