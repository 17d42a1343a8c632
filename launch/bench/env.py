"""`mario bench env`: raw emulator vs the package's env vs our wrapped pipeline, in one run."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time

import numpy as np
from gym_super_mario_bros.smb_env import SuperMarioBrosEnv

from common.config import EnvConfig
from common.mario_env import action_bytes, make_env
from launch.bench.checks import check_cpu, prepare_out
from launch.config import recipe_env


@dataclasses.dataclass(frozen=True)
class BenchEnvConfig:
    """Measure the environment pipeline's speed on one core."""

    env: EnvConfig = dataclasses.field(default_factory=recipe_env)
    """The pipeline being measured (`mario train`'s by default; its level is used for all three
    measurements)."""
    seconds: float = 10.0
    """Seconds spent on each of the three measurements."""
    cpu: int | None = 0
    """CPU core to pin this process to (None: do not pin)."""
    seed: int = 0
    """Seed of the random policy."""
    out: pathlib.Path = pathlib.Path("runs/bench/env.json")
    """Where the JSON result is written."""

    def __post_init__(self) -> None:
        if self.seconds <= 0:
            raise ValueError(f"seconds ({self.seconds}) must be > 0")
        check_cpu(self.cpu)


def raw_emulator_fps(level: tuple[int, int], seconds: float) -> float:
    """frame_advance in a loop (holding right), restarting the level on a death."""
    game = SuperMarioBrosEnv(target=level)
    game.reset()
    emulator, ram = game._env, game.ram
    frames, start = 0, time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for _ in range(100):
            emulator.frame_advance(0b10000000)
        frames += 100
        if ram[0x000E] in (0x06, 0x0B):
            game.reset()
    elapsed = time.perf_counter() - start
    game.close()
    return frames / elapsed


def _package_step_fps(config: EnvConfig, seconds: float, seed: int) -> float:
    """The package's own per-frame step() with random actions of the same set."""
    game = SuperMarioBrosEnv(target=config.levels[0])
    game.reset()
    codes = action_bytes(config.action_set)
    rng = np.random.default_rng(seed)
    frames, start = 0, time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        byte = int(codes[rng.integers(len(codes))])
        for _ in range(config.frame_skip):
            _, _, terminated, truncated, _ = game.step(byte)
            frames += 1
            if terminated or truncated:
                game.reset()
                break
    elapsed = time.perf_counter() - start
    game.close()
    return frames / elapsed


def _pipeline_rates(config: EnvConfig, seconds: float, seed: int) -> tuple[float, float]:
    """Our wrapped env with a random policy: (agent steps/s, emulator frames/s)."""
    env = make_env(config, seed=seed)
    rng = np.random.default_rng(seed)
    steps, frames, start = 0, 0, time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        _, _, terminated, truncated, info = env.step(int(rng.integers(env.action_space.n)))
        steps += 1
        frames += info["frames"]
        if terminated or truncated:
            _, info = env.reset()
            frames += info["frames"]
    elapsed = time.perf_counter() - start
    env.close()
    return steps / elapsed, frames / elapsed


def run(config: BenchEnvConfig) -> dict:
    """Runs the three measurements and returns (and writes) the result."""
    prepare_out(config.out)
    if config.cpu is not None:
        os.sched_setaffinity(0, {config.cpu})
    level = config.env.levels[0]
    raw_fps = raw_emulator_fps(level, config.seconds)
    package_fps = _package_step_fps(config.env, config.seconds, config.seed)
    steps_per_s, pipeline_fps = _pipeline_rates(config.env, config.seconds, config.seed)
    result = {
        "level": f"{level[0]}-{level[1]}",
        "action_set": config.env.action_set,
        "reward": config.env.reward,
        "frame_skip": config.env.frame_skip,
        "cpu": config.cpu,
        "seconds_each": config.seconds,
        "raw_emulator_frames_per_s": raw_fps,
        "package_step_frames_per_s": package_fps,
        "pipeline_agent_steps_per_s": steps_per_s,
        "pipeline_frames_per_s": pipeline_fps,
        "pipeline_fraction_of_raw": pipeline_fps / raw_fps,
        "package_step_fraction_of_raw": package_fps / raw_fps,
    }
    config.out.parent.mkdir(parents=True, exist_ok=True)
    config.out.write_text(json.dumps(result, indent=2) + "\n")
    return result
