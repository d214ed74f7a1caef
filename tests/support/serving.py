"""`order-saga serve` in a real subprocess for the tests that race HTTP requests against it:
started on a free port, polled until /healthz answers, stopped with SIGTERM; a fresh
database per test (serve applies the migrations itself)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from tests.support.database import create_pg_database, drop_pg_database
from tests.support.processes import Saga, command
from tests.support.services import answers, free_port
from tests.support.waiting import wait_until


@contextmanager
def fresh_database(kind: str, directory: str) -> Iterator[str]:
    """An empty database of `kind` (sqlite or postgresql) that nothing else uses."""
    if kind == "sqlite":
        yield f"sqlite:///{directory}/saga.db"
        return
    name = f"order_saga_serve_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    url = create_pg_database(name)
    try:
        yield url
    finally:
        drop_pg_database(name)


class Served:
    """One `order-saga serve --no-sweep` process (a `Saga`); its output goes to files."""

    def __init__(self, env: Mapping[str, str], *args: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.saga = Saga(command("serve", "--port", str(self.port), "--no-sweep", *args), env)

    def wait_ready(self, timeout: float = 60.0) -> Served:
        wait_until(
            lambda: answers(f"{self.url}/healthz"),
            timeout,
            what="serve to answer /healthz",
            alive=self.saga.running,
            explain=lambda: self.stop(),
        )
        return self

    def stop(self) -> str:
        """SIGTERM, and what it printed (a hung serve is killed and fails the test)."""
        result = self.saga.stop()
        return result.stdout + result.stderr


@contextmanager
def serving(env: Mapping[str, str], count: int = 1) -> Iterator[list[Served]]:
    """`count` serve processes on one database, started one after the other (the first
    applies the migrations), all stopped at the end."""
    started: list[Served] = []
    try:
        for _ in range(count):
            started.append(Served(env).wait_ready())
        yield started
    finally:
        for served in started:
            served.stop()
