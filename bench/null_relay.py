"""A relay whose every destination costs nothing to deliver to (bench only): the real
`fsm.relay.Relay` (its reads, its transaction per batch, the cursor's lease) with each send answered
"delivered" at once. Started as the relay child of `serve` is (`fsm.relay_child`: the
parent's settings on stdin, nice, stopped at stdin's end), so `bench.events_split` can
tell the database's share of the relay's cost from the deliveries' (HTTP, AMQP).

    python -m bench.null_relay   # settings JSON on stdin
"""

from __future__ import annotations

import asyncio
import contextlib

from fsm import relay_child
from fsm.destinations import DELIVERED, Attempt
from fsm.outbox_sql import Claimed, Destination
from fsm.relay import Relay
from fsm.wiring import close_store, relay_store


class NullSender:
    async def send(self, event: Claimed) -> Attempt:
        return DELIVERED

    async def aclose(self) -> None:
        return None


class NullRelay(Relay):
    def _sender(self, destination: Destination) -> NullSender:  # type: ignore[override]
        return NullSender()


def main() -> None:
    settings = relay_child.read_parent_settings()
    relay_child.yield_to_orders(settings)  # as every `order-saga relay`

    async def run() -> None:
        store = relay_store(settings)
        try:
            task = asyncio.create_task(NullRelay(store, settings).run())
            loop = asyncio.get_running_loop()
            relay_child.on_parent_gone(lambda: loop.call_soon_threadsafe(task.cancel))
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            await asyncio.to_thread(close_store, store)

    import uvloop

    uvloop.run(run())


if __name__ == "__main__":
    main()
