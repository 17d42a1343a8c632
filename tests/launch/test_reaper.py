"""The reaper: a driver killed with SIGKILL takes the processes it started with it; a driver
that says done (it cleaned up itself) leaves everything alone; older processes are never its."""

import os
import subprocess
import sys
import textwrap
import time

import pytest

from launch.reaper import TOKEN_VARIABLE, Reaper

DRIVER = textwrap.dedent("""
    import subprocess, sys, time
    from launch.reaper import Reaper
    older = subprocess.Popen(["sleep", "300"], start_new_session=True)
    time.sleep(0.05)
    reaper = Reaper()
    newer = subprocess.Popen(["sleep", "301"], start_new_session=True)  # in a session of its own
    print(older.pid, newer.pid, flush=True)
    if sys.argv[1] == "done":
        reaper.done()
    time.sleep(300)
""")


def _alive(pid: int) -> bool:
    result = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True)
    return result.stdout.strip() not in ("", "Z")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the reaper reads /proc")
@pytest.mark.parametrize("ending, newer_survives", [("killed", False), ("done", True)])
def test_a_killed_driver_takes_what_it_started_with_it(ending, newer_survives):
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, ending], stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    older, newer = (int(pid) for pid in driver.stdout.readline().split())
    try:
        time.sleep(2.5)  # the reaper notes descendants every second
        driver.kill()
        driver.wait()
        deadline = time.monotonic() + 20
        while _alive(newer) and time.monotonic() < deadline and not newer_survives:
            time.sleep(0.2)
        time.sleep(1)
        assert _alive(newer) == newer_survives
        assert _alive(older)  # started before the reaper: never the run's
    finally:
        subprocess.run(["kill", "-9", str(older), str(newer)], capture_output=True)


LATE_DRIVER = textwrap.dedent("""
    import os, signal, subprocess, time
    from launch.reaper import Reaper
    reaper = Reaper()
    time.sleep(1.5)  # the watchdog runs and polls
    # started in the driver's last moment: no poll of the watchdog can have noted it
    late = subprocess.Popen(["sleep", "302"], start_new_session=True)
    print(late.pid, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the reaper reads /proc")
def test_a_process_started_just_before_the_driver_died_is_found_by_its_environment():
    driver = subprocess.Popen([sys.executable, "-c", LATE_DRIVER], stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    late = int(driver.stdout.readline())
    try:
        driver.wait(timeout=30)
        deadline = time.monotonic() + 20
        while _alive(late) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(late)
    finally:
        subprocess.run(["kill", "-9", str(late)], capture_output=True)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the reaper reads /proc")
def test_the_run_token_lives_as_long_as_the_run(monkeypatch):
    monkeypatch.delenv(TOKEN_VARIABLE, raising=False)
    reaper = Reaper()
    token = os.environ[TOKEN_VARIABLE]  # what the run starts carries it
    assert token in reaper.process.args
    reaper.done()
    assert TOKEN_VARIABLE not in os.environ  # what starts after the run does not
