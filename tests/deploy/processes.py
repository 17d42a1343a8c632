"""Local processes for the deploy tests: free ports, programs by name, clean stops."""

from __future__ import annotations

import contextlib
import os
import pathlib
import random
import signal
import socket
import subprocess
import sys
import time

from common.redis_io import find_redis_server

BIN = pathlib.Path(sys.executable).parent

__all__ = ["BIN", "Process", "free_port", "local_program", "wait_for"]

# Ports a process started later will listen on come from neither the kernel's ephemeral range
# (32768–60999 here: any outgoing connection of the other test worker may take one meanwhile)
# nor Ray's worker ports (10002–19999): a port picked by binding to 0 was once taken by the
# other worker's Ray before `ray start --head` bound it as its dashboard's.
_LISTEN_PORTS = range(20_000, 32_000)
_random = random.Random(os.getpid())


def free_port() -> int:
    """A loopback port free now, outside the ephemeral and Ray worker port ranges."""
    for _ in range(1000):
        port = _random.choice(_LISTEN_PORTS)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {_LISTEN_PORTS}")


def local_program(name: str) -> str:
    """The local executable for a program a container runs by name."""
    if name == "redis-server":
        return find_redis_server()
    candidate = BIN / name  # mario and ray from this venv
    return str(candidate) if candidate.exists() else name


def wait_for(predicate, timeout: float, what: str, process: Process | None = None):
    """Polls until predicate() is true; fails early, with its log, if `process` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if process is not None and not process.alive():
            raise AssertionError(
                f"{process.argv[:2]} exited ({process.popen.returncode}) "
                f"while waiting for {what}\n{process.text()[-4000:]}"
            )
        time.sleep(1.0)
    tail = process.text()[-4000:] if process is not None else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")


class Process:
    """A child process with its output in a log file; stop() sends SIGTERM, then SIGKILL."""

    def __init__(self, argv: list[str], log: pathlib.Path, cwd: pathlib.Path, env: dict):
        self.argv, self.log = argv, log
        cwd.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            self.popen = subprocess.Popen(
                argv, cwd=cwd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 120) -> int:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()
            raise AssertionError(f"{self.argv[:3]} ignored SIGTERM for {timeout} s") from None

    def kill_group(self) -> None:
        """Last-resort cleanup: the whole process group."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()

    def text(self) -> str:
        return self.log.read_text(errors="replace")
