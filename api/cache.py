"""The gate's per-process lookup cache (`api.auth`): a key's principal, whether a console
session was signed out, whether authentication is on, each trusted for `ttl` seconds.
No database here: the lookups are the caller's; nothing is written.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import anyio.to_thread


class Cache:
    """A small per-process map of lookups with a time to live (monotonic clock), counted
    from when the lookup began, so a value is never served longer than `ttl` after the
    database said it. Lookups run in a thread, one at a time per key: the requests that
    find an entry missing or expired wait for the same lookup. Under load a key is then
    read once per `ttl` per process; before, every request that came while an entry was
    expired did its own read."""

    def __init__(self, ttl: float, size: int = 10_000) -> None:
        self.ttl = ttl
        self.size = size
        self._items: OrderedDict[Any, tuple[float, Any]] = OrderedDict()
        self._pending: dict[Any, asyncio.Task[Any]] = {}

    async def fetch(self, key: Any, lookup: Callable[[], Any]) -> Any:
        """The value of `key`: cached, else `lookup()` (blocking, run in a thread)."""
        now = time.monotonic()
        item = self._items.get(key)
        if item is not None and now < item[0]:
            return item[1]
        task = self._running(key) or self._start(key, lookup)
        return await asyncio.shield(task)

    async def settle(self) -> None:
        """Wait for the lookups in flight on this loop (before their engine is closed)."""
        loop = asyncio.get_running_loop()
        running = [t for t in self._pending.values() if t.get_loop() is loop and not t.done()]
        await asyncio.gather(*running, return_exceptions=True)

    def _running(self, key: Any) -> asyncio.Task[Any] | None:
        task = self._pending.get(key)
        # A task of another event loop (a test client's earlier portal) is no lookup here.
        if task is None or task.done() or task.get_loop() is not asyncio.get_running_loop():
            return None
        return task

    def _start(self, key: Any, lookup: Callable[[], Any]) -> asyncio.Task[Any]:
        began = time.monotonic()

        async def look() -> Any:
            value = await anyio.to_thread.run_sync(lookup)
            self._put(key, value, began + self.ttl)
            return value

        task = asyncio.get_running_loop().create_task(look())
        self._pending[key] = task
        task.add_done_callback(lambda done: self._finished(key, done))
        return task

    def _finished(self, key: Any, task: asyncio.Task[Any]) -> None:
        if self._pending.get(key) is task:
            del self._pending[key]
        if not task.cancelled():
            task.exception()  # retrieved here too: its waiters may all have gone

    def put(self, key: Any, value: Any) -> None:
        """What this process itself just wrote, known without a lookup."""
        self._put(key, value, time.monotonic() + self.ttl)

    def _put(self, key: Any, value: Any, expires: float) -> None:
        self._items[key] = (expires, value)
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)
