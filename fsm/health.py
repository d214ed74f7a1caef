"""Can this process take writes now? What `/healthz` and `/readyz` report (issue 16).

Two signals, both about the write path (reads have their own pool and their own 503):
the last transaction of the writer thread failed with a database error (disk full,
read-only file, server gone) and no write has committed since; or a probe sent through
the writer now does not commit within `probe_timeout` (another process holds SQLite's
write lock, the server refuses connections). Probes are cached for `every` seconds, so a
tight poll costs one round trip per interval. Decides nothing about orders, holds no lock
itself beyond the probe's empty transaction.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from fsm.errors import public_text
from fsm.store import Store

log = logging.getLogger("order_saga.health")


@dataclass(frozen=True)
class WriteStatus:
    writable: bool
    reason: str | None  # why not, in one line (never the driver's: /readyz is public)


class WriteHealth:
    def __init__(self, store: Store, *, probe_timeout: float = 1.0, every: float = 0.5) -> None:
        self.store = store
        self.probe_timeout = probe_timeout
        self.every = every
        self._checked_at = -1e9
        self._probe_error: str | None = None
        self._logged: str | None = None  # the probe's last failure, as logged
        self._lock = asyncio.Lock()

    async def check(self) -> WriteStatus:
        async with self._lock:  # concurrent polls share one probe
            if time.monotonic() - self._checked_at >= self.every:
                self._probe_error = await self._probe()
                self._checked_at = time.monotonic()
        if self._probe_error is not None:
            return WriteStatus(False, self._probe_error)
        failed = self.store.committer.last_error
        if failed is not None:
            return WriteStatus(False, f"the last write failed: {public_text(failed)}")
        return WriteStatus(True, None)

    async def _probe(self) -> str | None:
        # shield: a probe that outlives its timeout stays queued and completes (or fails)
        # in the writer like any op; only our wait for it ends.
        sent = asyncio.ensure_future(self.store.probe())
        sent.add_done_callback(lambda done: done.cancelled() or done.exception())  # read
        try:
            await asyncio.wait_for(asyncio.shield(sent), self.probe_timeout)
        except TimeoutError:
            return (
                f"a write waits more than {self.probe_timeout:g}s (the database is locked or slow)"
            )
        except Exception as exc:  # noqa: BLE001 - any failure means: cannot write now
            if str(exc) != self._logged:  # the driver's words (host, port): the log only,
                log.warning("cannot write: %s", exc)  # once while they stay the same
                self._logged = str(exc)
            return f"cannot write: {public_text(exc)}"
        self._logged = None
        return None
