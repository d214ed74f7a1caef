"""Running `order-saga` in real subprocesses: a clean environment, output to files, a hung
process killed and reported; the one start / wait-for-a-condition / SIGTERM helper (`Saga`
as a context manager with `wait_until(..., alive=saga.running)` and `saga.stop()`);
pausing a driver only between two transactions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from fsm.registry import STEPS
from tests.support.database import in_transaction_elsewhere
from tests.support.settings import cli_settings

REPO = Path(__file__).resolve().parent.parent.parent
ORDER_SAGA = str(Path(sys.executable).with_name("order-saga"))
FORWARD_ACTIONS = {row.name: row.forward for row in STEPS}
COMPENSATIONS = {row.name: row.undo for row in STEPS}
SUBPROCESS_TIMEOUT = 60.0


@dataclass(frozen=True)
class Result:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def explain(self) -> str:
        return (
            f"`{' '.join(self.args)}` exited {self.returncode}\n"
            f"--- stdout\n{self.stdout}--- stderr\n{self.stderr}"
        )


def run_cli(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """`order-saga ARGS` as a user types it: only PATH and `env` in its environment (and
    PYTHONPATH when the suite has one: the tree under test, e.g. a git worktree beside the
    checkout the virtualenv was installed from), text output captured (for one-line errors
    and exit codes); in `cwd` when given (where the default SQLite file is)."""
    kept = {k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ}
    if cwd is not None and kept:  # PYTHONPATH=. names the tree under test, not `cwd`
        entries = kept["PYTHONPATH"].split(os.pathsep)
        kept["PYTHONPATH"] = os.pathsep.join(str(Path(e).absolute()) for e in entries if e)
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin"), **kept, **env}
    return subprocess.run(
        [ORDER_SAGA, *args], capture_output=True, text=True, env=full_env, timeout=60, cwd=cwd
    )


def command(kind: str, *args: str) -> list[str]:
    """`resume`/`worker`/... -> the console script; `cancel` -> `order-saga orders cancel
    ID` (the same ORDER_SAGA_* settings, ORDER_SAGA_CRASH_AFTER included; it takes the id
    bare where `resume` takes `--order ID`)."""
    if kind == "cancel":
        return [ORDER_SAGA, "orders", "cancel", *(a for a in args if a != "--order")]
    return [ORDER_SAGA, kind, *args]


class Saga:
    """One `order-saga` (or helper) process; output goes to files, never to a pipe that
    could fill up while we wait on the other process."""

    def __init__(
        self, argv: Sequence[str], env: Mapping[str, str], *, session: bool = False
    ) -> None:
        """`session`: in a session (and process group) of its own, as a shell runs a
        foreground job: `os.killpg(saga.process.pid, SIGINT)` is then a Ctrl-C."""
        self.argv = tuple(argv)
        self._out: IO[bytes] = tempfile.TemporaryFile()
        self._err: IO[bytes] = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            self.argv,
            env=dict(env),
            cwd=REPO,
            stdout=self._out,
            stderr=self._err,
            start_new_session=session,
        )
        self._result: Result | None = None

    def wait(self, timeout: float = SUBPROCESS_TIMEOUT) -> Result:
        """The finished process's result (the same one when asked again); one that hangs is
        killed and fails the test (its -9 must never pass for a crash the test asked for)."""
        if self._result is not None:
            return self._result
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            hung = Result(self.argv, -9, self._read(self._out), self._read(self._err))
            raise AssertionError(f"still running after {timeout}s: {hung.explain()}") from None
        self._result = Result(self.argv, code, self._read(self._out), self._read(self._err))
        return self._result

    def running(self) -> bool:
        return self.process.poll() is None

    def stderr_so_far(self) -> str:
        """What it has written to stderr until now (while it runs: its log lines)."""
        return os.pread(self._err.fileno(), 1 << 20, 0).decode(errors="replace")

    def stop(self, timeout: float = 15) -> Result:
        """SIGTERM (a deploy, a Ctrl-C) and the result once it has shut down."""
        if self.running():
            self.process.terminate()
        return self.wait(timeout=timeout)

    def __enter__(self) -> Saga:
        return self

    def __exit__(self, *_: object) -> None:
        """Never leave a process behind to write into the next test."""
        if self.running():
            self.process.kill()
            self.process.wait()
        self._out.close()
        self._err.close()

    @staticmethod
    def _read(file: IO[bytes]) -> str:
        file.seek(0)
        text = file.read().decode(errors="replace")
        file.close()
        return text


def children(pid: int) -> list[int]:
    """The processes `pid` started that still run (Linux: /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # not a process, or gone
        if parent == pid:
            found.append(int(entry))
    return found


def run_saga(
    kind: str, *args: str, env: Mapping[str, str], timeout: float = SUBPROCESS_TIMEOUT
) -> Result:
    return Saga(command(kind, *args), env).wait(timeout)


async def drive_here(
    kind: str,
    order_id: uuid.UUID,
    *,
    database_url: str,
    services_url: str,
    settings: Mapping[str, Any],
) -> str:
    """`resume --order` / `cancel` in this process, wired like the CLI (never crashes):
    the cheap way to set the stage before the run that is killed. Returns the state."""
    from fsm.wiring import open_saga

    config = cli_settings(database_url, services_url, **settings)

    async with open_saga(config) as saga:
        run = saga.executor.cancel if kind == "cancel" else saga.executor.run
        return (await run(order_id)).state


def pause_between_transactions(saga: Saga, database_url: str, *, tries: int = 200) -> None:
    """SIGSTOP `saga`, but never while it holds a transaction open: a frozen writer would
    block every other driver (SQLite's write lock, a PostgreSQL row lock)."""
    for _ in range(tries):
        saga.process.send_signal(signal.SIGSTOP)
        time.sleep(0.02)  # let the stop land and the server notice a finished statement
        if not in_transaction_elsewhere(database_url):
            return
        saga.process.send_signal(signal.SIGCONT)
        time.sleep(0.01)
    raise AssertionError("could not catch the driver between two transactions")
