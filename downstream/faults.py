"""Injected faults: a queue per operation, each fault consumed by the next `count` calls.

In memory only, never persisted. `FaultBoard.run` wraps one call; it sleeps without
holding the store's lock, so a delayed call never blocks the others.
"""

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from downstream.store import Outcome, fail

Operation = Literal[
    "product.get",
    "user.deduct",
    "user.refund",
    "inventory.deduct",
    "inventory.restore",
    "shipping.schedule",
    "shipping.cancel",
    "sink.receive",  # the reference event consumer (downstream/sink.py)
]
Mode = Literal["error", "delay", "timeout", "apply_then_error"]
OPERATIONS: tuple[str, ...] = get_args(Operation)
MODES: tuple[str, ...] = get_args(Mode)

MAX_PENDING = 100  # fault entries on the board at once: a runaway script gets a 409

DEFAULT_SECONDS: dict[str, float] = {
    "error": 0.0,
    "delay": 1.0,
    "timeout": 30.0,  # longer than any sane client timeout
    "apply_then_error": 0.0,
}


@dataclass
class Fault:
    operation: str
    mode: str
    count: int  # calls still to affect
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class FaultBoard:
    """Pending faults, in the order they were added, per operation."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: dict[str, deque[Fault]] = {}
        # Bumped by `reset` (POST /_reset): a delayed call that outlives a reset belongs to
        # the world before it and changes nothing in the new one.
        self._epoch = 0

    def add(self, fault: Fault) -> Fault | None:
        """Queue `fault`; None (nothing queued) when MAX_PENDING entries are waiting."""
        with self._lock:
            if sum(len(queue) for queue in self._queues.values()) >= MAX_PENDING:
                return None
            self._queues.setdefault(fault.operation, deque()).append(fault)
        return fault

    def take(self, operation: str) -> Fault | None:
        """Consume one call's worth of the operation's first pending fault."""
        with self._lock:
            queue = self._queues.get(operation)
            if not queue:
                return None
            head = queue[0]
            head.count -= 1
            if head.count == 0:
                queue.popleft()
            return Fault(head.operation, head.mode, 1, head.seconds)

    def pending(self) -> list[Fault]:
        with self._lock:
            return [
                Fault(f.operation, f.mode, f.count, f.seconds)
                for queue in self._queues.values()
                for f in queue
            ]

    def clear(self) -> None:
        with self._lock:
            self._queues.clear()

    def reset(self) -> None:
        """Clear the faults and void the delayed calls still sleeping."""
        with self._lock:
            self._queues.clear()
            self._epoch += 1

    async def run(self, operation: str, call: Callable[[], Outcome]) -> Outcome:
        """Run `call` as the next fault for `operation` (if any) says.

        error -> 500, nothing done; delay -> sleep, then run; timeout -> sleep, then 504,
        nothing done; apply_then_error -> run (effect and idempotency record kept), then 500.
        A call still sleeping when the services are reset answers 503 and does nothing.
        """
        fault = self.take(operation)
        if fault is None:
            return call()
        if fault.mode == "error":
            return fail(500, "injected fault")
        epoch = self._epoch
        await asyncio.sleep(fault.seconds)
        if self._epoch != epoch:  # the services were reset meanwhile: not applied
            return fail(503, "the services were reset while this call was delayed")
        if fault.mode == "timeout":
            return fail(504, "injected timeout")
        outcome = call()
        if fault.mode == "apply_then_error":
            return fail(500, "injected fault")  # indistinguishable from a plain error
        return outcome
