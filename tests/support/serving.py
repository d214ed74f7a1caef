"""`order-saga serve` in a real subprocess for the tests that race HTTP requests against it:
started on a free port, polled until /healthz answers, stopped with SIGTERM; a fresh
database per test (serve applies the migrations itself)."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import IO

import httpx

from tests.support.database import create_pg_database, drop_pg_database
from tests.support.processes import ORDER_SAGA, REPO
from tests.support.services import free_port


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
    """One `order-saga serve --no-sweep` process; its output goes to a file."""

    def __init__(self, env: Mapping[str, str], *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log: IO[bytes] = tempfile.TemporaryFile()
        argv = [ORDER_SAGA, "serve", "--port", str(self.port), "--no-sweep", *args]
        self.process = subprocess.Popen(
            argv, env=dict(env), cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT
        )

    def wait_ready(self, timeout: float = 60.0) -> Served:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"serve exited {self.process.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"serve did not start:\n{self.output()}")
            time.sleep(0.05)

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        text = self.output()
        self._log.close()
        return text


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
