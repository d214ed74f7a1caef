"""Every relay yields the cores to the orders (ORDER_SAGA_RELAY_NICE): `order-saga relay`
run alone as much as the child `serve` and `worker` start (`relay --child`, its settings
on stdin)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from fsm.migrate import upgrade
from tests.support.processes import ORDER_SAGA
from tests.support.settings import saga_env, saga_settings
from tests.support.waiting import wait_until


def niceness(pid: int) -> int:
    """The process's nice value (field 19 of /proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])


def autogroup(pid: int) -> tuple[str, int] | None:
    """The process's autogroup (scheduled as one, sessions apart) and its nice value, or
    None in the default group: a session that never left init's (the file is empty), as
    CI's test runner does, where the first new session gets the first group of its own."""
    fields = Path(f"/proc/{pid}/autogroup").read_text().split()
    if not fields:
        return None
    name, _, nice = fields
    return name, int(nice)


@pytest.mark.parametrize(
    ("child", "session"),
    [(False, True), (False, False), (True, True)],
    ids=["alone", "from-a-shell", "child"],
)
def test_a_relay_runs_at_the_configured_lower_priority(
    tmp_path: Path, child: bool, session: bool
) -> None:
    url = f"sqlite:///{tmp_path}/saga.db"
    upgrade(url)
    argv = [ORDER_SAGA, "relay", *(["--child"] if child else [])]
    # The child takes its parent's settings (stdin), never its own environment's.
    env = saga_env(database_url=url, relay_nice=3 if child else 7)
    ours = autogroup(os.getpid())
    # Alone, as a service manager starts it, or as fsm.relay_child.supervise does: a session
    # (an autogroup) of its own. From a shell: the shell's session.
    relay = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, start_new_session=session)
    try:
        assert relay.stdin is not None
        if child:  # as fsm.relay_child.supervise starts it: its settings on stdin
            relay.stdin.write(saga_settings(url, relay_nice=7).model_dump_json().encode())
            relay.stdin.write(b"\n")
            relay.stdin.flush()
        nice = os.nice(0)
        wait_until(
            lambda: niceness(relay.pid) == nice + 7,
            what="the relay's lower priority",
            alive=lambda: relay.poll() is None,
        )
        if not session:  # its session is its parent's: the group (ours here) left as it was
            assert autogroup(relay.pid) == autogroup(os.getpid()) == ours
        else:  # its own session: the group lowered too, or the nice value ranks it nowhere
            assert autogroup(relay.pid) not in (None, ours)  # a group of its own
            wait_until(
                lambda: (autogroup(relay.pid) or ("", 0))[1] == 7,
                what="the relay's own autogroup lowered",
                alive=lambda: relay.poll() is None,
            )
    finally:
        relay.kill()
        relay.wait()
        if relay.stdin is not None:
            relay.stdin.close()
