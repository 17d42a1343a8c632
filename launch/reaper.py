"""A watchdog that kills what a driver started when the driver dies without cleaning up.

`mario train` starts processes that outlive a killed parent: the embedded redis-server (in a
session of its own) and the local Ray head (gcs_server, raylet, dashboard, agents, workers).
A normal stop, Ctrl-C, SIGTERM or an error releases them through the Trainer's ExitStack; a
`kill -9` or the OOM killer cannot. So the Trainer starts this watchdog (`python -m
launch.reaper DRIVER_PID SINCE TOKEN`) with a pipe on its stdin. Every second the watchdog notes the
driver's descendants started since the Trainer started it (pid and start time, from /proc).
When the pipe closes without the word "done" (the driver died: the kernel closes its end), it
sends SIGTERM to each noted process that still runs with the same start time, then SIGKILL to
what is left after a grace period. A process started after the last note (in the driver's last
second) is found by its environment: the driver sets MARIO_RUN_TOKEN, a random word of this
start, which everything it starts inherits (Ray's processes and workers, redis-server). Linux
only (/proc); elsewhere the watchdog does nothing.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
import uuid

GRACE_S = 5.0
TOKEN_VARIABLE = "MARIO_RUN_TOKEN"
POLL_S = 1.0


def process_table() -> dict[int, tuple[int, int]]:
    """pid → (parent pid, start time in clock ticks), for every process in /proc."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as file:
                stat = file.read().decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        table[int(name)] = (int(fields[1]), int(fields[19]))
    return table


def descendants(root: int, table: dict[int, tuple[int, int]]) -> dict[int, int]:
    """The descendants of `root` in `table`: pid → start time."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, stack = {}, list(children.get(root, []))
    while stack:
        pid = stack.pop()
        if pid not in found:
            found[pid] = table[pid][1]
            stack.extend(children.get(pid, []))
    return found


def carrying(token: str, since: int, table: dict[int, tuple[int, int]]) -> dict[int, int]:
    """The processes in `table` started at or after `since` whose environment has the token:
    pid → start time."""
    marker = f"{TOKEN_VARIABLE}={token}".encode()
    found = {}
    for pid, (_, start) in table.items():
        if start < since or pid == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as file:
                environment = file.read().split(b"\0")
        except OSError:
            continue
        if marker in environment:
            found[pid] = start
    return found


def reap(noted: dict[int, int], grace_s: float = GRACE_S) -> list[int]:
    """SIGTERM, then SIGKILL after `grace_s`, to each noted process still running as itself.
    Returns the pids signalled."""
    current = process_table()
    alive = [pid for pid, start in noted.items() if current.get(pid, (0, None))[1] == start]
    signalled = list(alive)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        current = process_table()
        alive = [pid for pid in alive if current.get(pid, (0, None))[1] == noted[pid]]
    for pid in alive:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return signalled


def now_ticks() -> int:
    """The time since boot in clock ticks, the unit of a process's start time in /proc."""
    with open("/proc/uptime") as file:
        return int(float(file.read().split()[0]) * os.sysconf("SC_CLK_TCK"))


def watch(driver: int, since: int, token: str = "", stdin_fd: int = 0) -> int:
    """Notes the driver's descendants started at or after `since` (clock ticks since boot)
    until stdin closes; reaps them, and the processes that carry `token`, unless told "done"."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the driver, which then says done
    own = os.getpid()
    noted: dict[int, int] = {}
    received = b""
    while True:
        ready, _, _ = select.select([stdin_fd], [], [], POLL_S)
        if ready:
            data = os.read(stdin_fd, 1024)
            received += data
            if not data:  # the pipe closed
                break
        found = descendants(driver, process_table())
        noted.update({pid: start for pid, start in found.items()
                      if start >= since and pid != own})  # fmt: skip
    if b"done" in received:
        return 0
    if token:
        noted.update(carrying(token, since, process_table()))
    reaped = reap(noted)
    print(f"reaper: driver {driver} died; signalled {len(reaped)} processes", file=sys.stderr)
    return 0


class Reaper:
    """The driver's side: starts the watchdog; done() tells it the driver cleaned up itself."""

    def __init__(self):
        self.process = None
        if sys.platform.startswith("linux"):
            # Only what starts from now on is the run's (the clock ticks are coarse: 10 ms).
            since = now_ticks() - 1
            token = uuid.uuid4().hex
            self._previous_token = os.environ.get(TOKEN_VARIABLE)
            os.environ[TOKEN_VARIABLE] = token  # inherited by all the driver starts from now on
            self.process = subprocess.Popen(
                [sys.executable, "-m", "launch.reaper", str(os.getpid()), str(since), token],
                stdin=subprocess.PIPE,
                start_new_session=True,  # a signal to the driver's process group spares it
            )

    def done(self) -> None:
        if self.process is None:
            return
        if self._previous_token is None:  # what this process starts next is not the run's
            os.environ.pop(TOKEN_VARIABLE, None)
        else:
            os.environ[TOKEN_VARIABLE] = self._previous_token
        with contextlib.suppress(OSError):
            self.process.stdin.write(b"done")
            self.process.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(watch(int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:4]))
