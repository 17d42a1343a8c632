"""`mario bench system`: the Ray backend for a fixed time, then the serial one, same config."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import tempfile

import numpy as np
from rich.console import Console

from launch.bench.checks import prepare_out
from launch.config import TrainConfig, recipe_replay
from launch.plots import load_metrics
from launch.trainer import train


def _default_train() -> TrainConfig:
    # `mario train`'s recipe, with a smaller replay whose learner starts early enough to be
    # measured inside a short window.
    replay = dataclasses.replace(recipe_replay(), capacity=50_000, min_size_to_sample=2_000)
    return TrainConfig(replay=replay)


MIN_SECONDS = 40.0


@dataclasses.dataclass(frozen=True)
class BenchSystemConfig:
    """Measure the whole trainer: distributed vs serial, each for the same time."""

    train: TrainConfig = dataclasses.field(default_factory=_default_train)
    seconds: float = 180.0
    """Wall-clock seconds for each mode (the first quarter is warm-up, not measured)."""
    skip_serial: bool = False
    """Measure only the distributed mode."""
    out: pathlib.Path = pathlib.Path("runs/bench/system.json")
    """Where the JSON result is written."""

    def __post_init__(self) -> None:
        if self.seconds < MIN_SECONDS:  # metrics every 5 s; a quarter of the time is warm-up
            raise ValueError(f"seconds ({self.seconds}) must be >= {MIN_SECONDS}, to log enough "
                             "metric records to measure after the warm-up")  # fmt: skip


def _window(records: list[dict], time_key: str) -> tuple[dict, dict] | None:
    """First and last record of the measured window (after a quarter of warm-up)."""
    records = [r for r in records if time_key in r]
    if len(records) < 2:
        return None
    start, end = records[0][time_key], records[-1][time_key]
    kept = [r for r in records if r[time_key] >= start + (end - start) / 4]
    return (kept[0], kept[-1]) if len(kept) >= 2 else (records[0], records[-1])


def measure(run_dir: pathlib.Path, batch_size: int) -> dict:
    """Rates over the measured window of a run's metrics (the same keys in both modes)."""
    records = [r for r in load_metrics(run_dir) if "wall_time" in r]
    window = _window(records, "wall_time")
    if window is None:
        raise RuntimeError(f"the run in {run_dir} logged too few records to measure")
    first, last = window
    kept = [r for r in records if first["wall_time"] <= r["wall_time"] <= last["wall_time"]]

    def delta(key: str) -> float:
        return last.get(key, 0) - first.get(key, 0)

    seconds = delta("wall_time")
    updates = delta("counters/updates")
    return {
        "env_frames_per_s": delta("counters/frames") / seconds,
        "env_steps_per_s": delta("counters/env_steps") / seconds,
        "learner_updates_per_s": updates / seconds,
        "learner_samples_per_s": updates * batch_size / seconds,
        "replay_ratio_samples_per_insert": updates * batch_size / max(delta("replay/inserted"), 1),
        "stream_lag_chunks_mean": float(np.mean([r.get("stream_lag_chunks", 0) for r in kept])),
        "policy_lag_updates_mean": float(np.mean([r.get("policy_lag", 0) for r in kept])),
        "measured_seconds": seconds,
    }


def run(config: BenchSystemConfig, console: Console) -> dict:
    prepare_out(config.out)
    batch = config.train.learner.batch_size
    base = dataclasses.replace(
        config.train,
        minutes=config.seconds / 60,
        total_env_steps=10**12,
        live_display=False,
        wandb="disabled",
        log_every_s=5.0,
        checkpoint_minutes=10**6,
        snapshot_replay=False,
    )
    result: dict = {"seconds_each": config.seconds, "batch_size": batch}
    modes = ("distributed",) if config.skip_serial else ("distributed", "serial")
    with tempfile.TemporaryDirectory(prefix="mario-bench-") as tmp:
        for mode in modes:
            run_dir = pathlib.Path(tmp) / mode
            train(dataclasses.replace(base, serial=mode == "serial", run_dir=run_dir), console)
            result[mode] = measure(run_dir, batch)
    result["num_actors"] = base.distributed.resolved_num_actors
    config.out.parent.mkdir(parents=True, exist_ok=True)
    config.out.write_text(json.dumps(result, indent=2) + "\n")
    return result
