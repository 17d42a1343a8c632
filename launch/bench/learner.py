"""`mario bench learner`: double-DQN updates per second, alone, per batch size, threads, device
and speed option (torch.compile, bf16 autocast, channels-last, CUDA graph)."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import numpy as np
import torch

from common.config import NetworkConfig, recipe_network
from launch.bench.checks import prepare_out
from launch.config import recipe_learner
from learner.learner import Learner, LearnerConfig
from replay_server.replay import Sample

_PLAIN = {"compile": False, "bf16": False, "channels_last": False, "cuda_graph": False}
VARIANTS = {  # name: LearnerConfig speed options
    "defaults": {},  # the learner's own: on CUDA channels-last and a CUDA graph
    "plain": _PLAIN,
    "compile": {**_PLAIN, "compile": True},
    "bf16": {**_PLAIN, "bf16": True},
    "channels-last": {**_PLAIN, "channels_last": True},
    "all": {**_PLAIN, "compile": True, "bf16": True, "channels_last": True},
    "cuda-graph": {**_PLAIN, "cuda_graph": True},
    # not speed: what recipe options cost on the defaults (AL's extra target forward; moving the
    # average of the weights after each step)
    "advantage-learning": {"advantage_learning": 0.9},
    "ema": {"ema_decay": recipe_learner().ema_decay},  # mario train's decay
}
CUDA_ONLY = {"cuda-graph", "defaults"}  # on the CPU the defaults are plain


@dataclasses.dataclass(frozen=True)
class BenchLearnerConfig:
    """Measure the learner's update rate on synthetic batches (no replay, no actors)."""

    batch_sizes: tuple[int, ...] = (32, 64, 128, 512)
    """Batch sizes to measure."""
    threads: tuple[int, ...] = (1, 2)
    """torch CPU thread counts to measure (CPU only)."""
    devices: tuple[str, ...] = ("cpu", "cuda")
    """Devices to measure; cuda is skipped where there is none."""
    variants: tuple[str, ...] = tuple(VARIANTS)
    """Speed options: defaults (the learner's), plain (none), compile, bf16, channels-last, all
    (those three), cuda-graph; defaults and cuda-graph are CUDA's only (skipped on the CPU);
    advantage-learning (the defaults with --learner.advantage-learning 0.9: its cost), ema (the
    defaults with mario train's --learner.ema-decay: its cost)."""
    seconds: float = 5.0
    """Seconds of measured updates per configuration (after warm-up)."""
    network: NetworkConfig = dataclasses.field(default_factory=recipe_network)
    num_actions: int = 2
    """Actions of the Q-network (`mario train`'s right_jump: 2; right_only: 5)."""
    out: pathlib.Path = pathlib.Path("runs/bench/learner.json")
    """Where the JSON result is written."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.variants) - set(VARIANTS))
        if unknown:
            raise ValueError(f"variants {unknown} are unknown; accepted: {', '.join(VARIANTS)}")
        if min(self.batch_sizes, default=0) < 1 or min(self.threads, default=0) < 1:
            raise ValueError(
                f"batch_sizes {self.batch_sizes} and threads {self.threads} must be >= 1"
            )
        if self.seconds <= 0:
            raise ValueError(f"seconds ({self.seconds}) must be > 0")


def synthetic_sample(rng: np.random.Generator, batch_size: int, num_actions: int) -> Sample:
    """A batch shaped like the replay's: uint8 stacks of 4 frames, random everything."""
    frames = rng.integers(0, 256, (batch_size, 4, 84, 84), dtype=np.uint8)
    return Sample(
        keys=np.arange(batch_size, dtype=np.int64),
        probabilities=np.full(batch_size, 1 / batch_size),
        weights=rng.random(batch_size).astype(np.float32),
        table_size=batch_size,
        obs=frames,
        actions=rng.integers(0, num_actions, batch_size),
        returns=rng.normal(size=batch_size).astype(np.float32),
        discounts=np.full(batch_size, 0.97, np.float32),
        next_obs=np.roll(frames, 1, axis=0),
    )


def measure(
    config: BenchLearnerConfig, device: str, batch_size: int, threads: int, variant: str
) -> dict:
    """Updates per second of one configuration."""
    torch.set_num_threads(threads)
    torch._dynamo.reset()  # each configuration compiles afresh, never past the recompile limit
    learner = Learner(
        LearnerConfig(batch_size=batch_size, device=device, **VARIANTS[variant]),
        config.network, config.num_actions,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    samples = [synthetic_sample(rng, batch_size, config.num_actions) for _ in range(4)]
    warm_start = time.perf_counter()
    for index in range(Learner.WARM_UP_UPDATES + 2):  # compile, allocate, capture the graph
        learner.update(samples[index % 4])
    warm_up_s = time.perf_counter() - warm_start
    updates, start = 0, time.perf_counter()
    while time.perf_counter() - start < config.seconds:
        learner.update(samples[updates % 4])  # returns |TD| on the CPU: synchronises CUDA
        updates += 1
    elapsed = time.perf_counter() - start
    return {
        "device": device,
        "batch_size": batch_size,
        "threads": threads if device == "cpu" else None,
        "variant": variant,
        "cuda_graph": learner.graphed,
        "updates_per_s": updates / elapsed,
        "samples_per_s": updates * batch_size / elapsed,
        "warm_up_s": warm_up_s,
    }


def run(config: BenchLearnerConfig) -> dict:
    prepare_out(config.out)
    devices = [d for d in config.devices if d == "cpu" or torch.cuda.is_available()]
    rows = []
    for device in devices:
        for threads in config.threads if device == "cpu" else (torch.get_num_threads(),):
            for batch_size in config.batch_sizes:
                for variant in config.variants:
                    if device == "cpu" and variant in CUDA_ONLY:
                        continue
                    rows.append(measure(config, device, batch_size, threads, variant))
    result = {
        "seconds_each": config.seconds,
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "rows": rows,
    }
    config.out.parent.mkdir(parents=True, exist_ok=True)
    config.out.write_text(json.dumps(result, indent=2) + "\n")
    return result
