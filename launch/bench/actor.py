"""`mario bench actor`: the whole actor path against the raw emulator, on one core."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time

import torch

from actors.actor import ActorConfig, ActorCore, slot_epsilons
from common.config import EnvConfig, NetworkConfig, recipe_network
from launch.bench.checks import check_cpu, prepare_out
from launch.bench.env import raw_emulator_fps
from launch.config import recipe_actor, recipe_env


@dataclasses.dataclass(frozen=True)
class BenchActorConfig:
    """Measure one actor (K envs + batched CPU inference + n-step adder + chunking)."""

    env: EnvConfig = dataclasses.field(default_factory=recipe_env)
    actor: ActorConfig = dataclasses.field(default_factory=recipe_actor)
    network: NetworkConfig = dataclasses.field(default_factory=recipe_network)
    seconds: float = 20.0
    """Seconds for each of the two measurements."""
    cpu: int | None = 0
    """CPU core to pin to (None: do not pin); torch uses one thread."""
    out: pathlib.Path = pathlib.Path("runs/bench/actor.json")
    """Where the JSON result is written."""

    def __post_init__(self) -> None:
        if self.seconds <= 0:
            raise ValueError(f"seconds ({self.seconds}) must be > 0")
        check_cpu(self.cpu)


def run(config: BenchActorConfig) -> dict:
    prepare_out(config.out)
    if config.cpu is not None:
        os.sched_setaffinity(0, {config.cpu})
    torch.set_num_threads(1)
    raw_fps = raw_emulator_fps(config.env.levels[0], config.seconds)
    epsilons = slot_epsilons(config.actor, band=0, bands=1)
    actor = ActorCore(config.env, config.actor, config.network, epsilons=epsilons)
    for _ in range(5):  # warm-up: first forward passes allocate
        actor.step()
    steps0, frames0, chunks, transitions = actor.env_steps, actor.frames, 0, 0
    start = time.perf_counter()
    deadline = start + config.seconds
    while time.perf_counter() < deadline:
        actor.step()
        for chunk in actor.take_chunks():
            chunks += 1
            transitions += len(chunk)
    elapsed = time.perf_counter() - start
    actor.close()
    frames_per_s = (actor.frames - frames0) / elapsed
    result = {
        "envs_per_actor": config.actor.envs_per_actor,
        "level": config.env.level,
        "cpu": config.cpu,
        "raw_emulator_frames_per_s": raw_fps,
        "actor_agent_steps_per_s": (actor.env_steps - steps0) / elapsed,
        "actor_frames_per_s": frames_per_s,
        "actor_fraction_of_raw": frames_per_s / raw_fps,
        "chunks_per_s": chunks / elapsed,
        "transitions_per_s": transitions / elapsed,
    }
    config.out.parent.mkdir(parents=True, exist_ok=True)
    config.out.write_text(json.dumps(result, indent=2) + "\n")
    return result
