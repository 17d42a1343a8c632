"""`mario bench replay`: insert and sample rates of the prioritized replay, and its bytes/item."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time

import numpy as np

from common.experience import synthetic_chunk
from launch.bench.checks import check_cpu, prepare_out
from replay_server.replay import PrioritizedReplay, ReplayConfig


@dataclasses.dataclass(frozen=True)
class BenchReplayConfig:
    """Measure the replay on one core."""

    capacity: int = 100_000
    """Replay capacity (transitions); the table is filled to capacity once."""
    chunk_length: int = 100
    """Transitions per inserted chunk (as actors send them)."""
    batch_size: int = 512
    """Sampled batch size."""
    sample_seconds: float = 10.0
    """Seconds spent sampling."""
    cpu: int | None = 0
    """CPU core to pin to (None: do not pin)."""
    out: pathlib.Path = pathlib.Path("runs/bench/replay.json")
    """Where the JSON result is written."""

    def __post_init__(self) -> None:
        for name in ("chunk_length", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} ({getattr(self, name)}) must be >= 1")
        if self.capacity < max(self.chunk_length, self.batch_size):
            raise ValueError(
                f"capacity ({self.capacity}) must hold a chunk (chunk_length "
                f"{self.chunk_length}) and a batch (batch_size {self.batch_size})"
            )
        if self.sample_seconds <= 0:
            raise ValueError(f"sample_seconds ({self.sample_seconds}) must be > 0")
        check_cpu(self.cpu)


def run(config: BenchReplayConfig) -> dict:
    prepare_out(config.out)
    if config.cpu is not None:
        os.sched_setaffinity(0, {config.cpu})
    rng = np.random.default_rng(0)
    pool = [synthetic_chunk(rng, config.chunk_length) for _ in range(16)]
    replay = PrioritizedReplay(
        ReplayConfig(capacity=config.capacity, min_size_to_sample=config.batch_size), seed=0
    )
    chunks_to_fill = config.capacity // config.chunk_length + 1
    start = time.perf_counter()
    for index in range(chunks_to_fill):
        replay.insert(pool[index % len(pool)])
    insert_s = time.perf_counter() - start
    inserted = chunks_to_fill * config.chunk_length
    samples, sample_time, update_time = 0, 0.0, 0.0
    deadline = time.perf_counter() + config.sample_seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        batch = replay.sample(config.batch_size, force=True)
        t1 = time.perf_counter()
        replay.update_priorities(batch.keys, rng.random(config.batch_size))
        t2 = time.perf_counter()
        sample_time += t1 - t0
        update_time += t2 - t1
        samples += 1
    result = {
        "capacity": config.capacity,
        "chunk_length": config.chunk_length,
        "batch_size": config.batch_size,
        "cpu": config.cpu,
        "inserts_per_s": inserted / insert_s,
        "sampled_batches_per_s": samples / sample_time,
        "priority_updates_per_s": samples / update_time,
        "size_at_capacity": replay.size,
        "bytes_total": replay.nbytes(),
        "bytes_per_transition": replay.nbytes() / replay.size,
        "evicted_by_frames": replay.evicted_by_frames,
    }
    config.out.parent.mkdir(parents=True, exist_ok=True)
    config.out.write_text(json.dumps(result, indent=2) + "\n")
    return result
