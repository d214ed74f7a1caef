"""Synchronizing a test on a condition, never on a fixed sleep (STYLE.md 17): poll until a
predicate holds or a deadline passes, and say what never happened. The deadline is a
safety net against a hang, not a timing assertion: it is generous on purpose."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TypeVar

T = TypeVar("T")
POLL = 0.05  # how often a condition is re-read: often enough, and cheap on two busy cores


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 60.0,
    *,
    what: str = "the condition",
    alive: Callable[[], bool] | None = None,
    interval: float = POLL,
    explain: Callable[[], str] = str,
) -> T:
    """The predicate's first truthy value; AssertionError naming `what` (and `explain()`,
    e.g. a process's output) after `timeout` seconds, or at once when `alive` (e.g. "the
    process still runs") turns false."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if alive is not None and not alive():
            raise AssertionError(f"gave up waiting for {what}: the process ended\n{explain()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{explain()}")
        time.sleep(interval)


async def wait_until_async(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float = 60.0,
    *,
    what: str = "the condition",
    interval: float = POLL,
) -> T:
    """`wait_until` for a test on the event loop: the loop keeps running between polls."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def past(moment: datetime, now: Callable[[], datetime]) -> Callable[[], bool]:
    """A predicate for "the clock has passed `moment`" (a lease's or a deadline's end),
    read from the same clock the engine uses."""
    return lambda: now() > moment
