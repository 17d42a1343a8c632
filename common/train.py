"""`mario train --serial`: actor core, replay and learner in one process (the debugging mode).

The same classes that the distributed trainer wraps in Ray actors run here in one loop: learn
whenever the replay's rate limiter allows a batch, act otherwise.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import logging
import pathlib
import signal
import time

import numpy as np
import torch
from rich.console import Console
from rich.live import Live
from rich.table import Table

from actors.actor import ActorConfig, ActorCore, EpisodeResult
from common.config import EnvConfig, NetworkConfig, config_from_dict, config_to_dict
from common.distributed import DistributedConfig
from common.metrics import MetricsLogger
from common.redis_io import RedisConfig
from learner.checkpoint import (
    CHECKPOINT_NAME,
    REPLAY_SNAPSHOT_NAME,
    load_checkpoint,
    save_checkpoint,
)
from learner.learner import Learner, LearnerConfig
from replay_server.replay import PrioritizedReplay, ReplayConfig

logger = logging.getLogger("train")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Train a double-DQN agent on Super Mario Bros."""

    env: EnvConfig = dataclasses.field(default_factory=EnvConfig)
    actor: ActorConfig = dataclasses.field(default_factory=ActorConfig)
    replay: ReplayConfig = dataclasses.field(default_factory=ReplayConfig)
    learner: LearnerConfig = dataclasses.field(default_factory=LearnerConfig)
    network: NetworkConfig = dataclasses.field(default_factory=NetworkConfig)
    redis: RedisConfig = dataclasses.field(default_factory=RedisConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    serial: bool = False
    """Run every role in this one process (the debugging mode)."""
    redis_url: str | None = None
    """redis:// or rediss:// (TLS) URL of an existing Redis; None starts an embedded one."""
    ray_address: str | None = None
    """Address of an existing Ray cluster (None: $RAY_ADDRESS, e.g. inside `ray job submit`, else
    a private local Ray)."""
    ray_head_port: int | None = None
    """Start a Ray head node on this port that other machines join with `ray start --address
    HOST:PORT` (the docker-compose trainer); None: see --ray-address."""
    ray_head_cpus: int | None = None
    """CPUs the head started by --ray-head-port offers (one for the learner, the rest for actors);
    None: all of this machine's."""
    ray_dashboard_port: int = 8265
    """Dashboard (and job API) port of the head started by --ray-head-port."""
    total_env_steps: int = 5_000_000
    """Stop after this many agent steps (over all envs)."""
    minutes: float | None = None
    """Stop after this many minutes of wall-clock time (None: no time limit)."""
    publish_every_updates: int = 50
    """Copy the learner's weights to the actors every this many updates."""
    checkpoint_minutes: float = 10.0
    """Write a checkpoint (and replay snapshot) every this many minutes, and at exit."""
    snapshot_replay: bool = True
    """Include the replay contents in checkpoints (needed for a warm --resume)."""
    run_dir: pathlib.Path | None = None
    """Run directory (default: runs/<date-time>)."""
    resume: pathlib.Path | None = None
    """Continue the run in this directory with its saved config and counters."""
    resume_existing: bool = False
    """If --run-dir already holds a checkpoint, continue it (as --resume does); else start a new
    run there. For services that restart (docker compose, RayJob)."""
    seed: int = 0
    """Random seed."""
    wandb: str = "auto"
    """W&B: auto (online with WANDB_API_KEY, else offline), online, offline, disabled."""
    log_every_s: float = 10.0
    """Seconds between metric records."""
    live_display: bool = True
    """Show the live console table (off for tests and non-terminals)."""
    torch_threads: int = 0
    """CPU threads for torch (0: torch's default)."""

    def __post_init__(self) -> None:
        if self.redis_url is not None and not self.redis_url.startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ValueError(
                f"redis_url {self.redis_url!r} must start with redis://, rediss:// or unix://"
            )
        if self.ray_head_port is not None and self.ray_address is not None:
            raise ValueError(
                f"ray_head_port ({self.ray_head_port}) and ray_address ({self.ray_address!r}) "
                "exclude each other: start a head, or join one"
            )
        for name in ("ray_head_port", "ray_dashboard_port"):
            port = getattr(self, name)
            if port is not None and not 1 <= port <= 65535:
                raise ValueError(f"{name} ({port}) must be a TCP port, 1..65535")
        if self.ray_head_cpus is not None and self.ray_head_cpus < 1:
            raise ValueError(f"ray_head_cpus ({self.ray_head_cpus}) must be >= 1 (the learner's)")
        if self.resume_existing and self.run_dir is None:
            raise ValueError("resume_existing needs --run-dir (the directory to continue)")
        if self.total_env_steps < 1:
            raise ValueError(f"total_env_steps ({self.total_env_steps}) must be >= 1")
        if self.minutes is not None and self.minutes <= 0:
            raise ValueError(f"minutes ({self.minutes}) must be > 0")
        if self.publish_every_updates < 1:
            raise ValueError(f"publish_every_updates ({self.publish_every_updates}) must be >= 1")
        if self.checkpoint_minutes <= 0:
            raise ValueError(f"checkpoint_minutes ({self.checkpoint_minutes}) must be > 0")
        if self.replay.rate_error_buffer < self.learner.batch_size:
            raise ValueError(
                f"replay.rate_error_buffer ({self.replay.rate_error_buffer}) must be >= "
                f"learner.batch_size ({self.learner.batch_size}), or no batch is ever allowed"
            )
        if self.replay.capacity < self.actor.chunk_length:
            raise ValueError(
                f"replay.capacity ({self.replay.capacity}) must hold one chunk "
                f"(actor.chunk_length {self.actor.chunk_length})"
            )

    @property
    def updates_per_env_step(self) -> float:
        """The replay ratio the rate limiter enforces."""
        return self.replay.samples_per_insert / self.learner.batch_size


class _Stop:
    """Turns SIGINT/SIGTERM into a flag the loop checks, so the exit checkpoint gets written."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            # signal() raises ValueError outside the main thread (e.g. a test runner's thread).
            with contextlib.suppress(ValueError):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclasses.dataclass
class _Counters:
    env_steps: int = 0
    frames: int = 0
    episodes: int = 0
    updates: int = 0
    flags: int = 0
    elapsed_s: float = 0.0


def _prepare(config: TrainConfig) -> tuple[TrainConfig, pathlib.Path, dict | None]:
    """Resolves the run directory; on --resume loads the checkpoint and its saved config."""
    existing = config.run_dir is not None and (config.run_dir / CHECKPOINT_NAME).exists()
    if config.resume is None and existing:
        if not config.resume_existing:
            raise ValueError(
                f"run_dir {config.run_dir} already holds a checkpoint: continue it with "
                f"--resume {config.run_dir} (or --resume-existing), or pick another --run-dir"
            )
        config = dataclasses.replace(config, resume=config.run_dir)
    if config.resume is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = config.run_dir or pathlib.Path("runs") / stamp
        return config, run_dir, None
    payload = load_checkpoint(config.resume)
    saved = config_from_dict(TrainConfig, payload["config"], "checkpoint config")
    # The saved run's settings win; the budget of this invocation decides how long to go on.
    config = dataclasses.replace(
        saved,
        total_env_steps=config.total_env_steps,
        minutes=config.minutes,
        resume=config.resume,
        live_display=config.live_display,
        wandb=config.wandb,
        redis_url=config.redis_url,
        ray_address=config.ray_address,
        ray_head_port=config.ray_head_port,
        ray_head_cpus=config.ray_head_cpus,
        ray_dashboard_port=config.ray_dashboard_port,
        resume_existing=config.resume_existing,
    )
    run_dir = pathlib.Path(config.resume)
    logger.info("resuming run %s at %s env steps", run_dir, payload["counters"].get("env_steps", 0))
    return config, run_dir, payload


def _status_table(
    config: TrainConfig,
    counters: _Counters,
    rates: dict,
    recent: collections.deque,
    replay: PrioritizedReplay,
) -> Table:
    table = Table(title=f"mario train --serial  level {config.env.level}", show_header=False)
    returns = [e.episode_return for e in recent]
    x_positions = [e.max_x_pos for e in recent]
    rows = [
        ("env steps", f"{counters.env_steps:,} / {config.total_env_steps:,}"),
        ("env steps/s", f"{rates.get('env_steps_per_s', 0):.1f}"),
        ("updates", f"{counters.updates:,}  ({rates.get('updates_per_s', 0):.1f}/s)"),
        ("episodes", f"{counters.episodes:,}  flags {counters.flags}"),
        ("last returns", " ".join(f"{r:.0f}" for r in returns[-5:]) or "-"),
        ("max x_pos (last 100)", f"{max(x_positions, default=0)}"),
        ("mean x_pos (last 100)", f"{np.mean(x_positions) if x_positions else 0:.0f}"),
        ("flag rate (last 100)", f"{np.mean([e.flag_get for e in recent]) if recent else 0:.2f}"),
        ("replay size", f"{replay.size:,}"),
        ("elapsed", f"{counters.elapsed_s / 60:.1f} min"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table


def train_serial(config: TrainConfig, console: Console | None = None) -> dict:
    """Runs the serial trainer until the step or time budget is spent, or a stop signal.

    Returns:
        Final counters and the run directory.
    """
    console = console or Console()
    config, run_dir, payload = _prepare(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    torch.manual_seed(config.seed)
    stack = config.env.frame_stack
    actor = ActorCore(config.env, config.actor, config.network, seed=config.seed)
    replay = PrioritizedReplay(config.replay, stack=stack, seed=config.seed)
    learner = Learner(config.learner, config.network, config.env.num_actions, stack)
    counters = _Counters()
    if payload is not None:
        learner.load_state_dict(payload["learner"])
        counters = _Counters(**payload["counters"])
        snapshot = run_dir / REPLAY_SNAPSHOT_NAME
        if snapshot.exists():
            replay.restore(snapshot)
        torch.set_rng_state(payload["rng"]["torch"])
        actor.rng.bit_generator.state = payload["rng"]["actor"]
        replay.rng.bit_generator.state = payload["rng"]["replay"]
        logger.info(
            "resumed %s at %d env steps, %d updates", run_dir, counters.env_steps, counters.updates
        )
    actor.set_weights(learner.cpu_weights(), learner.updates)
    frames_before = counters.frames
    metrics = MetricsLogger(
        run_dir, config_to_dict(config), config.wandb, resume=payload is not None
    )
    batch_size = config.learner.batch_size
    recent: collections.deque[EpisodeResult] = collections.deque(maxlen=100)

    def checkpoint() -> None:
        if config.snapshot_replay:
            replay.snapshot(run_dir / REPLAY_SNAPSHOT_NAME)
        save_checkpoint(
            run_dir,
            {
                "learner": learner.state_dict(),
                "config": config_to_dict(config),
                "counters": dataclasses.asdict(counters),
                "rng": {
                    "torch": torch.get_rng_state(),
                    "actor": actor.rng.bit_generator.state,
                    "replay": replay.rng.bit_generator.state,
                },
            },
        )

    start = time.monotonic() - counters.elapsed_s
    deadline = time.monotonic() + config.minutes * 60 if config.minutes else float("inf")
    next_checkpoint = time.monotonic() + config.checkpoint_minutes * 60
    last_rate_time, last_rate = time.monotonic(), dataclasses.replace(counters)
    last_log_time = time.monotonic()
    rates: dict[str, float] = {}
    last_metrics: dict[str, float] = {}
    live = Live(console=console, auto_refresh=False) if config.live_display else None
    if live:
        live.start()
    with _Stop() as stop:
        try:
            while counters.env_steps < config.total_env_steps and not stop.requested:
                now = time.monotonic()
                if now >= deadline:
                    break
                if replay.can_sample(batch_size):
                    sample = replay.sample(batch_size)
                    last_metrics, td_abs = learner.update(sample)
                    replay.update_priorities(sample.keys, td_abs)
                    counters.updates = learner.updates
                    if learner.updates % config.publish_every_updates == 0:
                        actor.set_weights(learner.cpu_weights(), learner.updates)
                else:
                    finished = actor.step()
                    counters.env_steps = counters.env_steps + len(actor.slots)
                    for chunk in actor.take_chunks():
                        replay.insert(chunk)
                    for episode in finished:
                        counters.episodes += 1
                        counters.flags += int(episode.flag_get)
                        recent.append(episode)
                        metrics.log(
                            {
                                "episode/return": episode.episode_return,
                                "episode/length": episode.length,
                                "episode/x_pos": episode.max_x_pos,
                                "episode/flag_get": int(episode.flag_get),
                                "episode/level": episode.level,
                                "episode/epsilon": episode.epsilon,
                            },
                            counters.env_steps,
                        )
                counters.frames = frames_before + actor.frames  # the actor counts from 0
                counters.elapsed_s = now - start
                if now - last_rate_time >= 1.0:
                    interval = now - last_rate_time
                    rates = {
                        "env_steps_per_s": (counters.env_steps - last_rate.env_steps) / interval,
                        "frames_per_s": (counters.frames - last_rate.frames) / interval,
                        "updates_per_s": (counters.updates - last_rate.updates) / interval,
                    }
                    last_rate_time, last_rate = now, dataclasses.replace(counters)
                    if live:
                        table = _status_table(config, counters, rates, recent, replay)
                        live.update(table, refresh=True)
                if now - last_log_time >= config.log_every_s:
                    record = {**last_metrics, **replay.stats()}
                    record.update({f"rate/{key}": value for key, value in rates.items()})
                    record.update(
                        episodes=counters.episodes,
                        updates=counters.updates,
                        frames=counters.frames,
                        elapsed_s=counters.elapsed_s,
                    )
                    metrics.log(record, counters.env_steps)
                    last_log_time = now
                if now >= next_checkpoint:
                    checkpoint()
                    next_checkpoint = now + config.checkpoint_minutes * 60
        finally:
            if live:
                live.stop()
            counters.elapsed_s = time.monotonic() - start
            for chunk in actor.take_chunks(flush=True):  # partial chunks: keep the experience
                replay.insert(chunk)
            checkpoint()
            metrics.close()
            actor.close()
    summary = {"run_dir": str(run_dir), **dataclasses.asdict(counters)}
    console.print(f"checkpoint written to {run_dir}; {summary}")
    return summary
