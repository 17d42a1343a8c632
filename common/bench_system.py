"""`mario bench system`: the distributed trainer for a fixed time, then serial mode, same config."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import tempfile

import numpy as np
from rich.console import Console

from common.plots import load_metrics
from common.train import TrainConfig, train_serial
from replay_server.replay import ReplayConfig


def _default_train() -> TrainConfig:
    # The learner starts early enough to be measured inside a short window.
    return TrainConfig(replay=ReplayConfig(capacity=50_000, min_size_to_sample=2_000))


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


def _window(records: list[dict], time_key: str) -> tuple[dict, dict] | None:
    """First and last record of the measured window (after a quarter of warm-up)."""
    records = [r for r in records if time_key in r]
    if len(records) < 2:
        return None
    start, end = records[0][time_key], records[-1][time_key]
    kept = [r for r in records if r[time_key] >= start + (end - start) / 4]
    return (kept[0], kept[-1]) if len(kept) >= 2 else (records[0], records[-1])


def _rates(first: dict, last: dict, keys: dict[str, str], batch_size: int) -> dict:
    """Rates between two metric records; `keys` names each quantity in this mode's records."""

    def delta(name: str) -> float:
        return last.get(keys[name], 0) - first.get(keys[name], 0)

    seconds = delta("time")
    updates = delta("updates")
    return {
        "env_frames_per_s": delta("frames") / seconds,
        "env_steps_per_s": delta("steps") / seconds,
        "learner_updates_per_s": updates / seconds,
        "learner_samples_per_s": updates * batch_size / seconds,
        "replay_ratio_samples_per_insert": updates * batch_size / max(delta("inserted"), 1),
        "measured_seconds": seconds,
    }


def measure_distributed(run_dir: pathlib.Path, batch_size: int) -> dict:
    records = load_metrics(run_dir)
    window = _window(records, "wall_time")
    if window is None:
        raise RuntimeError("the distributed run logged too few records to measure")
    first, last = window
    keys = {"time": "wall_time", "frames": "counters/frames", "steps": "counters/env_steps",
            "updates": "learner/updates", "inserted": "replay/inserted"}  # fmt: skip
    kept = [r for r in records if first["wall_time"] <= r.get("wall_time", -1) <= last["wall_time"]]
    return {
        **_rates(first, last, keys, batch_size),
        "stream_lag_chunks_mean": float(np.mean([r["stream_lag_chunks"] for r in kept])),
        "policy_lag_updates_mean": float(np.mean([r.get("policy_lag", 0) for r in kept])),
    }


def measure_serial(run_dir: pathlib.Path, batch_size: int) -> dict:
    records = [r for r in load_metrics(run_dir) if "frames" in r and "elapsed_s" in r]
    window = _window(records, "elapsed_s")
    if window is None:
        raise RuntimeError("the serial run logged too few records to measure")
    keys = {"time": "elapsed_s", "frames": "frames", "steps": "step", "updates": "updates",
            "inserted": "replay/inserted"}  # fmt: skip
    return _rates(*window, keys, batch_size)


def run(config: BenchSystemConfig, console: Console) -> dict:
    from common.distributed import train_distributed

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
    with tempfile.TemporaryDirectory(prefix="mario-bench-") as tmp:
        distributed_dir = pathlib.Path(tmp) / "distributed"
        train_distributed(dataclasses.replace(base, serial=False, run_dir=distributed_dir), console)
        result["num_actors"] = base.distributed.resolved_num_actors
        result["distributed"] = measure_distributed(distributed_dir, batch)
        if not config.skip_serial:
            serial_dir = pathlib.Path(tmp) / "serial"
            train_serial(dataclasses.replace(base, serial=True, run_dir=serial_dir), console)
            result["serial"] = measure_serial(serial_dir, batch)
    config.out.parent.mkdir(parents=True, exist_ok=True)
    config.out.write_text(json.dumps(result, indent=2) + "\n")
    return result
