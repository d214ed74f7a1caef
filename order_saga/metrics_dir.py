"""The directory `serve --workers N` sums its workers' /metrics in (prometheus_client's
multiprocess mode): made by the parent, removed when it returns, and, for a parent killed
outright (kill -9 skips that), removed by the next `serve --workers` that starts.

How a directory is known to be stale, safely: it is ours (same uid, a real directory, not
a link) and its lock file is not held. The parent holds an flock on `parent.lock` for the
directory's life and its forked workers inherit it, so the lock goes only when every one
of them is gone (the kernel releases it, kill -9 included). Unlike a pid, a lock is not
fooled by a pid reused or by a parent in another pid namespace sharing /tmp. A directory
without the lock file (an older release's, or one being made) is left alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
PREFIX = "order-saga-metrics-"
LOCK = "parent.lock"  # prometheus_client reads only *.db files there


@contextlib.contextmanager
def shared_metrics(workers: int) -> Iterator[None]:
    """With several workers, a fresh private directory in `PROMETHEUS_MULTIPROC_DIR` for
    the block, removed after it: a scrape reaches one worker, which then serves all of
    theirs summed (fsm.metrics.registry) instead of only its own (11 orders split 3/8
    scraped as 3 or 8, never 11, and Prometheus saw resets). prometheus_client chooses
    where values live when it is imported, so the parent must not have imported it: each
    worker does, after the fork, and writes its own files there."""
    if workers < 2:
        yield
        return
    if "prometheus_client" in sys.modules:  # its values would stay in each worker's memory
        raise RuntimeError("prometheus_client was imported before the workers' fork")
    remove_stale(tempfile.gettempdir())
    directory = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-")
    held = hold(directory)
    os.environ[MULTIPROC_DIR] = directory
    try:
        yield
    finally:
        shutil.rmtree(os.environ.pop(MULTIPROC_DIR), ignore_errors=True)
        os.close(held)


def hold(directory: str) -> int:
    """The lock file, locked before it takes its name: a `remove_stale` that finds it
    finds it held (locked under its final name, the instant between would look stale)."""
    making = os.path.join(directory, f"{LOCK}.new")
    fd = os.open(making, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.rename(making, os.path.join(directory, LOCK))
    return fd


def remove_stale(root: str) -> list[Path]:
    """Remove the metrics directories under `root` whose parent and workers are all gone
    (see the module's docstring); the ones removed."""
    removed = []
    for path in Path(root).glob(f"{PREFIX}*"):
        try:
            info = path.lstat()
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
                continue
            fd = os.open(path / LOCK, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:  # gone meanwhile, or no lock file: not ours to judge
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its serve (or a worker of it) still runs
            continue
        else:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(fd)
    return removed
