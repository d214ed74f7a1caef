"""A child process that must not outlive its parent, kill -9 of the parent included."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int, parent: int | None = None) -> None:
    """Have the kernel send `signum` to this process when its parent dies (Linux). With
    `parent` (its pid, taken before the fork), a parent already gone by then, whose death
    the kernel would not report any more, sends it at once."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signum)
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), signum)
