"""`mario chaos`: trains while killing its roles one after another, then checks the books.

It starts its own redis-server (append-only, as the embedded one), runs `mario train
--redis-url …` on it, and every `--every-s` seconds SIGKILLs the next role of: an actor, the
replay shard, the learner (Ray processes), the redis-server (each in turn, in a shuffled order;
a role with no process at that moment, one Ray is restarting, is tried again next time, and
skipped after three tries).
This script restarts a killed redis-server after 1–5 s, as an external Redis that comes back.
Meanwhile it reads the run's counters every second. After the last kill it waits (up to
`--recover-s`) for a new heartbeat from every actor and the learner that had one before the
first kill, then stops the run with SIGTERM and checks:

- training progressed (env steps and learner updates grew after the first kill);
- those roles all came back (a heartbeat after the last kill);
- no counter ever went backwards;
- every chunk is accounted for: chunks_written == inserted + rejected + still in the stream;
- the run exited cleanly, and no process it started is left.

and says what each kill cost (`losses`): updates, replay transitions, unwritten env steps.

It prints the result, writes it to RUN_DIR/chaos.json, and exits 1 if a check failed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time

import redis

from common.redis_io import EmbeddedRedis, RedisKeys, connect
from launch.reaper import descendants, process_table
from launch.trainer import BACKEND_COUNTERS

logger = logging.getLogger("chaos")
ROLES = ("actor", "shard", "learner", "redis-server")
_ROLE_TITLES = {"actor": "ray::ActorWorker", "shard": "ray::ShardWorker",
                "learner": "ray::LearnerWorker"}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ChaosConfig:
    """Train for --minutes while SIGKILLing a random role every --every-s seconds; check after."""

    run_dir: pathlib.Path = pathlib.Path("runs/chaos")
    """The run directory: a new one, or an earlier chaos run's (emptied first)."""
    minutes: float = 5.0
    """How long the run trains under fire."""
    every_s: float = 30.0
    """Seconds between two kills."""
    roles: tuple[str, ...] = ROLES
    """Roles to kill, each in turn (the order is shuffled once)."""
    kills: int | None = None
    """Stop after this many kills (and `every_s` more seconds of training), if before --minutes."""
    recover_s: float = 120.0
    """After the last kill, how long to wait for every role that had a heartbeat before the
    first kill to send one again (checked: roles_back)."""
    seed: int = 0
    """Seed of the choice of roles."""
    train_args: str = ""
    """More `mario train` flags, as one string: --train-args="--replay.capacity 20000"."""

    def __post_init__(self) -> None:
        unknown = set(self.roles) - set(ROLES)
        if unknown or not self.roles:
            raise ValueError(f"roles {sorted(unknown) or '()'} are not in {ROLES}")
        if self.minutes <= 0 or self.every_s <= 0:
            raise ValueError(f"minutes ({self.minutes}) and every_s ({self.every_s}) must be > 0")
        if self.kills is not None and self.kills < 1:
            raise ValueError(f"kills ({self.kills}) must be >= 1")
        if self.recover_s < 0:
            raise ValueError(f"recover_s ({self.recover_s}) must be >= 0")
        try:
            shlex.split(self.train_args)
        except ValueError as error:
            raise ValueError(f"train_args {self.train_args!r}: {error}") from None


def _role_pids(driver: int, title: str) -> list[int]:
    """The driver's descendants whose command line starts with `title`."""
    pids = []
    for pid in descendants(driver, process_table()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as file:
                command = file.read().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if command.startswith(title):
            pids.append(pid)
    return pids


CHAOS_LOG = "chaos-train.log"


def run(config: ChaosConfig) -> dict:
    run_dir = config.run_dir
    if run_dir.exists():  # only an earlier chaos run's directory is emptied
        if not run_dir.is_dir() or (any(run_dir.iterdir()) and not (run_dir / CHAOS_LOG).exists()):
            raise ValueError(
                f"run_dir {run_dir} exists and is not an earlier chaos run's directory (it has "
                f"no {CHAOS_LOG}): chaos empties its run directory, so pick a new one"
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    server = EmbeddedRedis(data_dir=run_dir.parent / f"{run_dir.name}-redis")
    try:
        return _run_under_fire(config, server)
    finally:
        server.stop()  # also when the run went wrong: no redis-server is left behind


def _run_under_fire(config: ChaosConfig, server: EmbeddedRedis) -> dict:
    run_dir = config.run_dir
    rng = random.Random(config.seed)
    order = rng.sample(config.roles, len(config.roles))  # every role in turn, in a random order
    keys = RedisKeys(run_dir.name)
    client = connect(server.url)
    command = [sys.executable, "-m", "launch.cli", "train", "--redis-url", server.url,
               "--run-dir", str(run_dir), "--total-env-steps", "1000000000", "--no-live-display",
               "--wandb", "offline", *shlex.split(config.train_args)]  # fmt: skip
    log = (run_dir / CHAOS_LOG).open("w")
    driver = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    kills: list[dict] = []
    backwards: list[str] = []
    last: dict[str, int] = {}
    first_kill_counters: dict[str, int] | None = None
    beating: set[str] = set()  # the roles with a heartbeat before the first kill
    last_kill_wall = 0.0
    start = time.monotonic()
    next_kill = start + config.every_s
    redis_back_at: float | None = None
    noted: dict[int, int] = {}  # the run's processes: pid → start time
    turn = misses = 0  # whose turn it is; how often in a row that role had no process

    def read_counters() -> dict[str, int] | None:
        try:
            raw = client.hgetall(keys.counters)
        except redis.RedisError:
            return None
        return {k.decode(): int(v) for k, v in raw.items()}

    try:
        while time.monotonic() - start < config.minutes * 60:
            time.sleep(1.0)
            if driver.poll() is not None:
                break
            noted.update(descendants(driver.pid, process_table()))
            if redis_back_at is not None and time.monotonic() >= redis_back_at:
                server.restart_if_dead()
                redis_back_at = None
            counters = read_counters()
            if counters:
                for name in BACKEND_COUNTERS:
                    if counters.get(name, 0) < last.get(name, 0):
                        backwards.append(f"{name}: {last[name]} → {counters.get(name, 0)}")
                _attribute(kills, last, counters)
                last = {**last, **{k: max(v, last.get(k, 0)) for k, v in counters.items()}}
            if time.monotonic() < next_kill or redis_back_at is not None:
                continue
            if first_kill_counters is None and not last.get("updates"):
                continue  # the first kill waits until the learner has begun
            if config.kills is not None and sum(1 for k in kills if k["pid"]) >= config.kills:
                break  # the last kill, then `every_s` of training after it
            next_kill = time.monotonic() + config.every_s
            role = order[turn % len(order)]
            if role == "redis-server":
                pids = [server.process.pid] if server.process.poll() is None else []
            else:
                pids = _role_pids(driver.pid, _ROLE_TITLES[role])
            if not pids:
                kills.append({"t": round(time.monotonic() - start, 1), "role": role, "pid": None})
                misses += 1
                if misses == 3:  # not there three times in a row: the next role's turn
                    turn, misses = turn + 1, 0
                continue
            turn, misses = turn + 1, 0
            pid = rng.choice(pids)
            if first_kill_counters is None:
                first_kill_counters = dict(last)
                beating = set(_heartbeats(client, keys))
            os.kill(pid, signal.SIGKILL)
            last_kill_wall = time.time()
            kills.append({"t": round(time.monotonic() - start, 1), "role": role, "pid": pid,
                          "counters": dict(last)})  # fmt: skip
            logger.info("killed %s (pid %d)", role, pid)
            if role == "redis-server":
                server.process.wait()
                redis_back_at = time.monotonic() + rng.uniform(1, 5)
        if redis_back_at is not None:
            time.sleep(max(0.0, redis_back_at - time.monotonic()))
            server.restart_if_dead()
        missing = _wait_for_heartbeats(client, keys, beating, last_kill_wall, config.recover_s,
                                       alive=lambda: driver.poll() is None)  # fmt: skip
        driver.send_signal(signal.SIGTERM)
        exit_code = driver.wait(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        log.close()
    if exit_code != 0:
        tail = (run_dir / CHAOS_LOG).read_text(errors="replace")[-2000:]
        logger.error("mario train exited with %d; the end of %s:\n%s", exit_code, CHAOS_LOG, tail)
    # What the run left: its counters and the stream (the chunks no shard took), in this Redis.
    server.restart_if_dead()
    final = read_counters() or {}
    _attribute(kills, last, final)
    backlog = client.xlen(keys.experience)
    time.sleep(6)  # the reaper's grace period, if the driver had died
    left = _leftovers(noted)
    server.stop()
    baseline = first_kill_counters or {}
    checks = {
        "progressed": final.get("env_steps", 0) > baseline.get("env_steps", 0)
        and final.get("updates", 0) > baseline.get("updates", 0),
        "counters_never_backwards": not backwards,
        "chunks_accounted": final.get("chunks_written", 0)
        == final.get("chunks_inserted", 0) + final.get("chunks_rejected", 0) + backlog,
        "roles_back": not missing,
        "clean_exit": exit_code == 0,
        "no_process_left": not left,
    }
    result = {
        "losses": losses([k for k in kills if k["pid"]], final),
        "minutes": config.minutes,
        "every_s": config.every_s,
        "order": order,
        "kills": kills,
        "counters_at_first_kill": baseline,
        "final_counters": final,
        "stream_backlog": backlog,
        "backwards": backwards,
        "roles_not_back": missing,
        "exit_code": exit_code,
        "left_processes": left,
        "checks": checks,
        "passed": all(checks.values()),
    }
    (run_dir / "chaos.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _heartbeats(client, keys: RedisKeys) -> dict[str, float]:
    """Role → the wall time of its latest heartbeat ({} while Redis is down)."""
    try:
        return {k.decode(): float(v) for k, v in client.hgetall(keys.heartbeats).items()}
    except redis.RedisError:
        return {}


def _wait_for_heartbeats(
    client, keys: RedisKeys, roles: set[str], since: float, timeout_s: float, alive=lambda: True
) -> list[str]:
    """Waits until each role has a heartbeat newer than `since`; returns those that had none
    in `timeout_s` (a restarted actor takes a while on a busy machine), or when `alive()` says
    the run has ended."""
    deadline = time.monotonic() + timeout_s
    while True:
        beats = _heartbeats(client, keys)
        missing = sorted(role for role in roles if beats.get(role, 0.0) <= since)
        if not missing or time.monotonic() >= deadline or not alive():
            return missing
        time.sleep(1.0)


# A loss counter → the role whose restart adds to it.
LOSS_COUNTERS = {"updates_lost": "learner", "replay_transitions_lost": "shard"}


def _attribute(kills: list[dict], last: dict[str, int], counters: dict[str, int]) -> None:
    """Adds what each loss counter grew by since `last` to the latest kill of its role (a role
    restarts in its own time, often after the next kill)."""
    for name, role in LOSS_COUNTERS.items():
        grew = counters.get(name, 0) - last.get(name, 0)
        target = next((k for k in reversed(kills) if k["role"] == role and k["pid"]), None)
        if grew > 0 and target is not None:
            target[name] = target.get(name, 0) + grew


def losses(kills: list[dict], final: dict[str, int]) -> list[dict]:
    """What each kill cost, and what the run did until the next one: the learner's updates
    lost (it restarted from an older state) and the transitions a restarted shard's replay lost
    (taken in after its snapshot), as attributed while the run went on; and, from the counters
    read just before each kill and at the end, env steps counted but never written as
    transitions (an actor's unsent chunks and n-step tail; ± one chunk per env, which is in
    flight at any time)."""
    rows = []
    afters = [k["counters"] for k in kills[1:]] + [final]
    for kill, after in zip(kills, afters[: len(kills)], strict=True):
        before = kill["counters"]

        def delta(name, before=before, after=after):
            return after.get(name, 0) - before.get(name, 0)

        rows.append({
            "t": kill["t"], "role": kill["role"],
            "updates_lost": kill.get("updates_lost", 0),
            "replay_transitions_lost": kill.get("replay_transitions_lost", 0),
            "env_steps_not_written": delta("env_steps") - delta("transitions_written"),
            "env_steps_after": delta("env_steps"), "updates_after": delta("updates"),
        })  # fmt: skip
    return rows


def _leftovers(noted: dict[int, int]) -> list[str]:
    """The noted processes (pid → start time) that still run as themselves."""
    current = process_table()
    left = []
    for pid, start_time in noted.items():
        if current.get(pid, (0, None))[1] != start_time:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as file:
                command = file.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        left.append(f"{pid} {command[:120]}")
    return left
