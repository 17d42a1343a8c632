"""The distributed trainer with real parts: redis-server, local Ray, the emulator, 2 actors."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import ray
import redis
import torch

from common.redis_io import RedisKeys
from launch.cli import main
from launch.reaper import descendants, process_table
from learner.checkpoint import load_checkpoint

TINY = [
    "train",
    "--replay.capacity", "4000",
    "--replay.min-size-to-sample", "300",
    "--replay.samples-per-insert", "2",
    "--replay.rate-error-buffer", "64",
    "--learner.batch-size", "16",
    "--learner.target-sync-updates", "10",
    "--actor.envs-per-actor", "2",
    "--actor.chunk-length", "50",
    "--env.max-episode-steps", "200",
    "--distributed.num-actors", "2",
    "--distributed.weights-poll-frames", "100",
    "--distributed.batches-per-request", "2",
    "--publish-every-updates", "2",
    "--eval.every-env-steps", "600",
    "--eval.episodes", "1",
    "--wandb", "offline",
    "--no-live-display",
    "--log-every-s", "2",
]  # fmt: skip


def processes(pattern: str, under: int | None = None) -> list[str]:
    """`pid command` of the processes matching pattern that these tests started: a Ray cluster
    that already ran on the machine (a training run beside the tests) is not theirs; with
    `under`, only that process's descendants (other tests' clusters may run beside)."""
    result = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True)
    mine = set(descendants(under, process_table())) if under is not None else None
    lines = [line for line in result.stdout.splitlines() if line.split()[0] not in PREEXISTING]
    return [line for line in lines if mine is None or int(line.split()[0]) in mine]


PREEXISTING = set()
PREEXISTING = {line.split()[0] for line in processes("raylet|gcs_server|ray::")}


def leftover_processes(run_dir, driver: int | None = None) -> str:
    """Ray's daemons (of the driver's own Ray session when its pid is known: a training run
    started beside the tests is not theirs), and the run's embedded redis-server (its title
    names its port)."""
    port = (run_dir / "redis_url").read_text().strip().rsplit(":", 1)[1].split("/")[0]
    ray = f"(raylet|gcs_server).*session_[^ ]*_{driver}/" if driver else "raylet|gcs_server"
    return "\n".join(processes(f"{ray}|redis-server 127.0.0.1:{port}"))


# The learner keeps an average of its weights (published beside them); the evaluator plays it
# and the online net on the same seeds.
AVERAGED = ["--learner.ema-decay", "0.9", "--eval.compare-online"]


@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("dist")
    main([*TINY, *AVERAGED, "--total-env-steps", "1500", "--run-dir", str(run_dir)])
    return run_dir


def test_experience_flows_learner_updates_actors_get_new_weights(distributed_run):
    payload = load_checkpoint(distributed_run)
    counters = payload["counters"]
    assert counters["env_steps"] >= 1500
    assert counters["chunks_written"] > 0 and counters["chunks_inserted"] > 0
    assert payload["learner"]["updates"] > 0
    records = [json.loads(x) for x in (distributed_run / "metrics.jsonl").read_text().splitlines()]
    versions = [r["episode/policy_version"] for r in records if "episode/policy_version" in r]
    assert max(versions) > 0  # actors acted with weights the learner published
    system = [r for r in records if "actors/frames_per_s" in r]
    assert system and {"policy_lag", "stream_lag_chunks", "replay/size"} <= set(system[-1])
    # the learner's |TD| came back to the shard as priorities (fire and forget over Ray)
    assert system[-1]["replay/priority_updates"] > 0
    assert (distributed_run / "replay-0.npz").exists()
    evals = [r for r in records if "eval/flag_rate" in r]  # the evaluator worker's rounds
    assert evals and all(r["step"] >= 600 for r in evals)
    assert all("eval_online/flag_rate" in r for r in evals)  # the average's rounds, compared
    assert payload["learner"]["ema"].keys() == payload["learner"]["online"].keys()
    # The round at the budget played the weights the run ends with (the average the learner
    # published last, once the actors had stopped), at the final checkpoint's env steps
    last = load_checkpoint(sorted((distributed_run / "eval").glob("round-*.pt"))[-1])
    assert last["counters"]["env_steps"] == counters["env_steps"]
    assert last["counters"]["updates"] == payload["learner"]["updates"]
    ema = payload["learner"]["ema"]
    assert all(torch.equal(last["learner"]["online"][k], ema[k]) for k in ema)
    assert load_checkpoint(distributed_run / "best.pt")["eval"]["env_steps"] >= 600
    assert list((distributed_run / "wandb").glob("offline-run-*"))
    assert leftover_processes(distributed_run, os.getpid()) == ""


def test_resume_continues_counters_and_replay(distributed_run):
    before = load_checkpoint(distributed_run)
    main([*TINY, "--total-env-steps", "2200", "--resume", str(distributed_run)])
    after = load_checkpoint(distributed_run)
    assert after["counters"]["env_steps"] >= 2200
    assert after["learner"]["updates"] >= before["learner"]["updates"]
    with np.load(distributed_run / "replay-0.npz") as snapshot:
        inserted = int(snapshot["counters"][7])
    assert inserted > before["counters"]["chunks_inserted"] * 50  # warm: old + new contents
    assert leftover_processes(distributed_run, os.getpid()) == ""


def _env_steps(metrics) -> int:
    if not metrics.exists():
        return 0
    steps = [json.loads(line).get("counters/env_steps", 0) for line in
             metrics.read_text().splitlines()]  # fmt: skip
    return max(steps, default=0)


def _start_run(run_dir, *flags: str) -> subprocess.Popen:
    """`mario train` (TINY, no budget to speak of) in a process of its own; stderr piped."""
    command = [sys.executable, "-m", "launch.cli", *TINY, "--total-env-steps", "100000000",
               *flags, "--run-dir", str(run_dir)]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)  # fmt: skip


def _updates(metrics) -> int:
    if not metrics.exists():
        return 0
    updates = [json.loads(line).get("counters/updates", 0) for line in
               metrics.read_text().splitlines()]  # fmt: skip
    return max(updates, default=0)


def _wait_for(process, condition, timeout_s=240):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(1)


def _wait_for_steps(process, metrics, target, timeout_s=240):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _env_steps(metrics) > target:
            return
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        time.sleep(1)
    raise AssertionError(f"env steps did not pass {target} in {timeout_s} s")


def test_serial_resume_of_a_ray_run_is_an_error_naming_both_modes(distributed_run, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--serial", "--resume", str(distributed_run)])
    assert exit_info.value.code == 1
    text = " ".join(capsys.readouterr().out.split())
    assert "--serial: the run has False, the command line says True" in text


def _metric_keys(run_dir) -> set[str]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*records)
    return {re.sub(r"actor-\d+", "actor-N", key) for key in keys}  # one per actor


def test_serial_and_ray_runs_write_the_same_metric_keys(distributed_run, tmp_path):
    serial_dir = tmp_path / "serial"
    drop = {
        "--distributed.num-actors",
        "--distributed.weights-poll-frames",
        "--distributed.batches-per-request",
    }  # Ray's own
    flags = [a for i, a in enumerate(TINY) if a not in drop and TINY[i - 1] not in drop]
    # 700 env steps: episodes (200 steps), updates (from 300) and an evaluation round (at 600)
    main([*flags, *AVERAGED, "--serial", "--total-env-steps", "700", "--run-dir",
          str(serial_dir)])  # fmt: skip
    ray_keys, serial_keys = _metric_keys(distributed_run), _metric_keys(serial_dir)
    assert ray_keys == serial_keys, (ray_keys - serial_keys, serial_keys - ray_keys)
    assert {"learner/loss", "replay/size", "counters/env_steps", "rate/frames_per_s",
            "episode/x_pos", "policy_lag", "stream_lag_chunks",
            "driver/malformed_records", "eval_online/flag_rate"} <= ray_keys  # fmt: skip


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ("MARIO_LEARNER_FAILURE_AT_UPDATE=20",
         r"the learner failed: RuntimeError: injected failure at update 20"),
        # an error in an actor's code is not a dead process: Ray restarting it would not help
        ("MARIO_ACTOR_FAILURE_AT_STEP=200",
         r"actor [01] failed: RuntimeError: injected failure at env step 200"),
    ],
)  # fmt: skip
def test_a_failing_role_ends_the_run_with_its_error_and_leaves_no_process(tmp_path, fault, error):
    run_dir = tmp_path / "failing"
    command = [sys.executable, "-m", "launch.cli", *TINY, "--total-env-steps", "100000000",
               "--run-dir", str(run_dir)]  # fmt: skip
    name, value = fault.split("=")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, name: value})  # fmt: skip
    stdout, stderr = process.communicate(timeout=400)
    assert process.returncode == 1
    assert re.search(error, " ".join(stdout.split())), stdout[-2000:]
    assert error.split(": ", 1)[1] in stderr  # its traceback, in the log
    assert leftover_processes(run_dir, process.pid) == ""


def test_a_new_run_on_a_redis_that_holds_its_name_is_refused_or_starts_from_zero(
    redis_url, tmp_path, capsys
):
    run_dir, keys = tmp_path / "named", RedisKeys("named")
    command = [*TINY, "--total-env-steps", "400", "--redis-url", redis_url,
               "--run-dir", str(run_dir)]  # fmt: skip
    client = redis.Redis.from_url(redis_url)
    # A live run elsewhere whose directory has the same name holds it: refused, nothing started.
    client.set(keys.driver, "/elsewhere/named", ex=30)
    with pytest.raises(SystemExit) as exit_info:
        main(command)
    assert exit_info.value.code == 1
    text = " ".join(capsys.readouterr().out.split())
    assert f"Redis {redis_url} is in use by the run in /elsewhere/named" in text
    assert not (run_dir / "checkpoint.pt").exists() and not ray.is_initialized()
    assert not (run_dir / "invocations.jsonl").exists()  # a start that was refused trained nothing
    # That run ended; an earlier start of this one died before its first checkpoint, leaving
    # counters and experience in this Redis (it persists): the new run starts from 0.
    client.delete(keys.driver)
    client.hset(keys.counters, mapping={"env_steps": 1_000_000, "updates": 50_000})
    client.xadd(keys.experience, {"m": b"not a chunk of this run"})
    main(command)
    counters = load_checkpoint(run_dir)["counters"]
    assert 400 <= counters["env_steps"] < 1_000_000 and counters["updates"] < 50_000
    assert counters["chunks_rejected"] == 0
    assert client.get(keys.driver) is None  # released at the end
    # A branch's first start is a new run too: what this Redis holds under the branch's name
    # (an earlier start of it that died before its first checkpoint) is dropped, not read.
    branch, branch_keys = tmp_path / "branch", RedisKeys("branch")
    client.xadd(branch_keys.experience, {"m": b"not a chunk of this run"})
    client.hset(branch_keys.counters, mapping={"episodes_stale": 7})
    main([*TINY, "--total-env-steps", str(counters["env_steps"] + 200), "--redis-url", redis_url,
          "--run-dir", str(branch), "--branch-from", str(run_dir)])  # fmt: skip
    branched = load_checkpoint(branch)["counters"]
    assert branched["env_steps"] >= counters["env_steps"] + 200
    assert branched["chunks_rejected"] == counters["chunks_rejected"] == 0  # the stale entry
    assert "episodes_stale" not in branched and client.get(branch_keys.driver) is None


def test_redis_restarted_then_killed_driver_leaves_no_process_and_resume_says_what_was_lost(
    tmp_path, caplog
):
    run_dir = tmp_path / "killed"
    metrics = run_dir / "metrics.jsonl"
    process = _start_run(run_dir, "--checkpoint-minutes", "0.25")
    try:
        _wait_for_steps(process, metrics, 0)
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoint.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        # The embedded redis-server dies: the driver restarts it from its append-only file,
        # the roles' commands retry meanwhile, and training goes on.
        run_processes = leftover_processes(run_dir, process.pid).splitlines()
        (server,) = [line.split()[0] for line in run_processes if "redis-server" in line]
        os.kill(int(server), signal.SIGKILL)
        time.sleep(2)
        _wait_for_steps(process, metrics, _env_steps(metrics) + 200)
        servers = [
            line
            for line in leftover_processes(run_dir, process.pid).splitlines()
            if "redis-server" in line
        ]
        assert len(servers) == 1 and servers[0].split()[0] != server
        _wait_for_steps(process, metrics, load_checkpoint(run_dir)["counters"]["env_steps"] + 100)
        assert leftover_processes(run_dir, process.pid) != ""  # its redis-server, raylet, gcs
        os.kill(process.pid, signal.SIGKILL)  # only the driver: no cleanup of its own
        process.wait(timeout=10)
        deadline = time.monotonic() + 60  # the reaper notices at once, then allows 5 s' grace
        while leftover_processes(run_dir, process.pid) and time.monotonic() < deadline:
            time.sleep(1)
        assert leftover_processes(run_dir, process.pid) == ""
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert (
        "the embedded redis-server had ended (exit -9); restarted" in process.stderr.read().decode()
    )
    reached = json.loads((run_dir / "status.json").read_text())["counters"]["env_steps"]
    saved = load_checkpoint(run_dir)["counters"]["env_steps"]
    assert reached > saved
    with caplog.at_level("WARNING", logger="train"):
        main([*TINY, "--total-env-steps", str(saved + 50), "--resume", str(run_dir)])
    assert f"the run had reached {reached} env steps; its checkpoint holds {saved}" in caplog.text
    assert leftover_processes(run_dir, os.getpid()) == ""
