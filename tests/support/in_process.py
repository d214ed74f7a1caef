"""`run_cli`'s twin in this process, for the cases of a family of refusals (a bad flag, a bad
setting: exit 2 and one line) beyond the one each family still runs as a real process.

A console-script process costs ~1 s of CPU (the interpreter, typer, pydantic, SQLAlchemy);
the same refusal in this process costs a few milliseconds. It is the same code path:
`order_saga.cli.main`, the entry point the console script calls (its one-line usage
errors and exit codes), with stdout and stderr captured apart and the environment
`run_cli` gives a process: no ORDER_SAGA_* variable of this one, `env` set, in `cwd`.
The commands that run until stopped (serve, services, worker, relay) always get a real
process: in this one, a refusal that broke would start them here, never to return.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from order_saga import cli, logs
from tests.support.processes import run_cli

RUN_UNTIL_STOPPED = {"serve", "services", "worker", "relay"}


def run_cli_here(
    *args: str, cwd: Path | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """`order-saga ARGS` through the console script's entry point, in this process (but
    RUN_UNTIL_STOPPED: `run_cli`); the result as `run_cli` returns it."""
    if args and args[0] in RUN_UNTIL_STOPPED:
        return run_cli(*args, cwd=cwd, **env)
    unset: dict[str, str | None] = {k: None for k in os.environ if k.startswith("ORDER_SAGA_")}
    argv = ["order-saga", *args]
    where = contextlib.chdir(cwd) if cwd is not None else contextlib.nullcontext()
    with where, CliRunner().isolation(env={**unset, **env}) as (out, err, _):
        saved, sys.argv = sys.argv, argv
        try:
            cli.main()
            code = 0  # main() always exits; kept for the type checker
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        finally:
            sys.argv = saved
            logs.flush()  # the lines the writer thread still holds, into `err`
            sys.stdout.flush()
            sys.stderr.flush()
        return subprocess.CompletedProcess(
            argv, code, out.getvalue().decode(), err.getvalue().decode()
        )


Run = Callable[..., "subprocess.CompletedProcess[str]"]  # run_cli or run_cli_here


def first_in_a_process(cases: Iterable[Any], ids: Callable[[Any], str] | None = None) -> list[Any]:
    """A family's parameters, each with the runner its test calls appended: the first
    case `run_cli` (the console script in a real process: its exit code, its stderr), the
    others `run_cli_here`. A case is a tuple of the test's arguments, or one argument."""
    found = []
    for i, case in enumerate(cases):
        values = case if isinstance(case, tuple) else (case,)
        run: Run = run_cli if i == 0 else run_cli_here
        found.append(pytest.param(*values, run, id=None if ids is None else ids(case)))
    return found
