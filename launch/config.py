"""`mario train`'s config, and how a run is prepared: a new run directory, or a saved run resumed.

A resumed run takes its mode and every training setting from its checkpoint; only the settings
of this invocation (budget, where Redis and Ray are, display, logging) come from the command
line. A command-line value that contradicts the run is an error that names both.

A branch (--branch-from PARENT --run-dir NEW) is a new run that starts where PARENT's latest
checkpoint stands (weights, optimizer, counters, replay, evaluation state) with the training
settings given on the command line changed, e.g. sticky actions switched on for the rest of the
budget. Its history (metrics.jsonl, invocations.jsonl, best.pt) is copied, and its invocation
record names the parent, so the new run holds the whole account of how its weights were made.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import pathlib

from actors.actor import ActorConfig
from common.config import (
    EnvConfig,
    NetworkConfig,
    config_from_dict,
    config_to_dict,
    recipe_network,
)
from common.metrics import WANDB_MODES
from common.redis_io import RedisConfig, check_redis_url
from launch.evaluate import TrainEvalConfig
from learner.checkpoint import (
    BEST_NAME,
    CHECKPOINT_NAME,
    MANIFEST_NAME,
    SET_DIR_KEY,
    CheckpointError,
    holds_checkpoint,
    link_or_copy,
    load_checkpoint,
    save_checkpoint,
    write_manifest,
)
from learner.learner import LearnerConfig
from replay_server.replay import ReplayConfig

logger = logging.getLogger("train")
DASHBOARD_PORT = 8265  # Ray's default dashboard port


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Processes of the Ray backend."""

    num_actors: int | None = None
    """Actor processes at the start (1 CPU each); None: one per CPU the cluster has free once the
    learner holds its CPU, at least 1."""
    max_actors: int | None = None
    """Elastic actors: when CPUs join the cluster during the run, start actors on them up to this
    many in all. None: --distributed.num-actors when that is given (a fixed pool), else no cap."""
    num_shards: int = 1
    """Replay shards, each holding --replay.capacity transitions; the learner samples them in
    proportion to their total priority."""
    prefetch: int = 4
    """Sample requests the learner keeps in flight."""
    batches_per_request: int = 1
    """Batches each sample request asks a shard for (a Ray call costs about 2 ms here whatever
    it carries: `mario bench feed`); the learner's priority updates go back to a shard
    together, once per this many batches."""
    weights_poll_frames: int = 400
    """Emulator frames between an actor's checks of the weights version."""

    def __post_init__(self) -> None:
        if self.num_actors is not None and self.num_actors < 1:
            raise ValueError(f"num_actors ({self.num_actors}) must be >= 1")
        if self.max_actors is not None and self.max_actors < max(1, self.num_actors or 1):
            raise ValueError(
                f"max_actors ({self.max_actors}) must be >= 1 and >= num_actors ({self.num_actors})"
            )
        if self.num_shards < 1:
            raise ValueError(f"num_shards ({self.num_shards}) must be >= 1")
        if self.prefetch < 1:
            raise ValueError(f"prefetch ({self.prefetch}) must be >= 1")
        if self.batches_per_request < 1:
            raise ValueError(f"batches_per_request ({self.batches_per_request}) must be >= 1")
        if self.weights_poll_frames < 1:
            raise ValueError(f"weights_poll_frames ({self.weights_poll_frames}) must be >= 1")

    @property
    def resolved_num_actors(self) -> int:
        """The initial count on this machine alone (a local Ray: every CPU but the learner's)."""
        return self.num_actors or max(1, (os.cpu_count() or 2) - 1)

    @property
    def resolved_max_actors(self) -> int | None:
        return self.max_actors if self.max_actors is not None else self.num_actors


# `mario train`'s recipe (docs/learning.md, the ablation): where it differs from the parts'
# own defaults, which stay the tutorial's and Ape-X's. The two actions [right], [right, A] with
# a jump that always jumps (release_jump), the downsample graphics (gym-super-mario-bros 7.x's
# SuperMarioBros-v1 ROM: the ablation's row `downsample` had 51 training flags by 300k env
# steps, 44 of them in the last 100k, against 2–38 for the rest on its recipe, and the highest mean
# max x over its greedy evaluation rounds; one run), a stuck episode ended as a death after 100
# steps without progress, +50 at the flag, rewards ÷ 10, γ 0.99, ε decaying from 1 over ~100k
# env steps toward a 0.1…0.01 ladder (plain ε-greedy: temporally-extended ε, a default from
# session 10 to 12, had 5/10 greedy flags at 300k in its row and 0/10 in the run that repeated
# it, and was not tested with the downsample graphics), a dueling net of conv 16-32-32 and 256
# hidden units (learns as well as Nature's at 300k env steps, 1.8× the updates/s), Adam 1e-4
# stepping down to 2.5e-5 at update 180,000 (about 1.44M env steps: the long run's branch
# default-1-lowlr, whose rounds flagged in 6 of 12 against 0 of 8 before it — one run, no
# control arm, and that branch also trained with sticky actions, which the defaults do not),
# target sync every 500 updates, 4 samples per insert; evaluation plays (and `mario export`
# ships) an average of the online net's weights, decay 0.9998 (about 5,000 updates: run ema-3,
# the defaults from 0 with both played on the same seeds each round, docs/training-runs.md;
# training itself does not read it).
def recipe_env() -> EnvConfig:
    return EnvConfig(
        action_set="right_jump", stuck_steps=100, stuck_is_death=True, flag_bonus=50.0,
        reward_scale=0.1, release_jump=True, graphics="downsample",
    )  # fmt: skip


def recipe_actor() -> ActorConfig:
    return ActorConfig(gamma=0.99, epsilon_decay_steps=100_000, epsilon_base=0.1, epsilon_alpha=1.0)


def recipe_replay() -> ReplayConfig:
    return ReplayConfig(samples_per_insert=4.0)


def recipe_learner() -> LearnerConfig:
    return LearnerConfig(
        learning_rate=1e-4, learning_rate_final=2.5e-5, learning_rate_decay_start=180_000,
        target_sync_updates=500, ema_decay=0.9998,
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Train a double-DQN agent on Super Mario Bros."""

    env: EnvConfig = dataclasses.field(default_factory=recipe_env)
    actor: ActorConfig = dataclasses.field(default_factory=recipe_actor)
    replay: ReplayConfig = dataclasses.field(default_factory=recipe_replay)
    learner: LearnerConfig = dataclasses.field(default_factory=recipe_learner)
    network: NetworkConfig = dataclasses.field(default_factory=recipe_network)
    redis: RedisConfig = dataclasses.field(default_factory=RedisConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    eval: TrainEvalConfig = dataclasses.field(default_factory=TrainEvalConfig)
    serial: bool = False
    """Run every role in this one process (the debugging mode; no Redis, no Ray)."""
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
    ray_dashboard_port: int = DASHBOARD_PORT
    """Dashboard (and job API) port of the head started by --ray-head-port."""
    total_env_steps: int = 5_000_000
    """Stop after this many agent steps (over all envs). A resumed run keeps its own budget
    unless this is given."""
    minutes: float | None = None
    """Stop after this many minutes of wall-clock time (None: no time limit)."""
    publish_every_updates: int = 50
    """Copy the learner's weights to the actors every this many updates."""
    checkpoint_minutes: float = 10.0
    """Write a checkpoint (and replay snapshots) every this many minutes, and at exit."""
    snapshot_replay: bool = True
    """Include the replay contents in checkpoints (needed for a warm --resume)."""
    run_dir: pathlib.Path | None = None
    """Run directory (default: runs/<date-time>)."""
    resume: pathlib.Path | None = None
    """Continue the run in this directory: its mode, saved config, counters and replay."""
    resume_existing: bool = False
    """If --run-dir already holds a checkpoint, continue it (as --resume does); else start a new
    run there. For services that restart (docker compose, RayJob)."""
    branch_from: pathlib.Path | None = None
    """Start --run-dir as a branch of this run: from its latest checkpoint (weights, optimizer,
    counters, replay), with the training settings given here changed. Env steps go on counting
    from the parent's. Ignored when --run-dir already holds a checkpoint (--resume-existing)."""
    seed: int = 0
    """Random seed."""
    wandb: str = "auto"
    """W&B: auto (online with WANDB_API_KEY, else offline), online, offline, disabled."""
    log_every_s: float = 10.0
    """Seconds between metric records."""
    live_display: bool = True
    """Show the live console table (off for tests and non-terminals)."""
    torch_threads: int = 0
    """CPU threads for the learner's torch (0: torch's default)."""

    def __post_init__(self) -> None:
        check_redis_url(self.redis_url)
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
        if (
            self.resume is not None
            and self.run_dir is not None
            and pathlib.Path(self.resume).resolve() != pathlib.Path(self.run_dir).resolve()
        ):
            raise ValueError(
                f"resume ({self.resume}) and run_dir ({self.run_dir}) differ: a resumed run goes "
                "on in its own directory (to start a new one from it, use --branch-from)"
            )
        if self.resume_existing and self.run_dir is None:
            raise ValueError("resume_existing needs --run-dir (the directory to continue)")
        if self.branch_from is not None:
            if self.run_dir is None or self.resume is not None:
                raise ValueError(
                    f"branch_from ({self.branch_from}) needs --run-dir (the new run) and no "
                    "--resume"
                )
            if pathlib.Path(self.branch_from).resolve() == pathlib.Path(self.run_dir).resolve():
                raise ValueError(f"branch_from ({self.branch_from}) must differ from --run-dir")
        if self.total_env_steps < 1:
            raise ValueError(f"total_env_steps ({self.total_env_steps}) must be >= 1")
        if self.seed < 0:
            raise ValueError(f"seed ({self.seed}) must be >= 0")
        if self.wandb not in WANDB_MODES:
            raise ValueError(f"wandb {self.wandb!r} is unknown; accepted: {', '.join(WANDB_MODES)}")
        if self.minutes is not None and self.minutes <= 0:
            raise ValueError(f"minutes ({self.minutes}) must be > 0")
        if self.publish_every_updates < 1:
            raise ValueError(f"publish_every_updates ({self.publish_every_updates}) must be >= 1")
        if self.checkpoint_minutes <= 0:
            raise ValueError(f"checkpoint_minutes ({self.checkpoint_minutes}) must be > 0")
        if self.log_every_s <= 0:
            raise ValueError(f"log_every_s ({self.log_every_s}) must be > 0")
        if self.torch_threads < 0:
            raise ValueError(f"torch_threads ({self.torch_threads}) must be >= 0")
        if self.replay.rate_error_buffer < self.learner.batch_size:
            raise ValueError(
                f"replay.rate_error_buffer ({self.replay.rate_error_buffer}) must be >= "
                f"learner.batch_size ({self.learner.batch_size}), or no batch is ever allowed"
            )
        if self.eval.compare_online and not self.learner.averaged:
            raise ValueError(
                f"eval.compare_online ({self.eval.compare_online}) compares the online net with "
                f"the average of its weights, but learner.ema_decay is {self.learner.ema_decay} "
                "(no average): give --learner.ema-decay too (e.g. 0.9998), or "
                "--eval.no-compare-online"
            )
        if self.replay.capacity < self.actor.chunk_length:
            raise ValueError(
                f"replay.capacity ({self.replay.capacity}) must hold one chunk "
                f"(actor.chunk_length {self.actor.chunk_length})"
            )
        if self.serial:
            _refuse_ray_only_options(self)
        head_only = [
            f"{name} ({value})"
            for name, value, default in (
                ("ray_head_cpus", self.ray_head_cpus, None),
                ("ray_dashboard_port", self.ray_dashboard_port, DASHBOARD_PORT),
            )
            if value != default
        ]
        if self.ray_head_port is None and head_only:
            raise ValueError(
                f"{' and '.join(head_only)}: a setting of the Ray head that --ray-head-port "
                "starts; give --ray-head-port too, or leave it out"
            )


# Settings of one invocation, taken from the command line when a run is resumed; every other
# field comes from the saved run.
INVOCATION_FIELDS = frozenset({
    "total_env_steps", "minutes", "resume", "resume_existing", "branch_from", "run_dir",
    "live_display",
    "wandb", "log_every_s", "checkpoint_minutes", "redis_url", "ray_address", "ray_head_port",
    "ray_head_cpus", "ray_dashboard_port", "redis", "distributed.num_actors",
    "distributed.max_actors", "torch_threads", "learner.device", "learner.compile",
    "learner.bf16", "learner.channels_last", "learner.cuda_graph", "eval.keep_weights",
})  # fmt: skip

# Options that only the Ray backend has: with --serial they are refused, not ignored.
_RAY_ONLY_FIELDS = (
    "redis_url", "ray_address", "ray_head_port", "ray_head_cpus", "ray_dashboard_port", "redis",
    "distributed.max_actors", "distributed.num_shards", "distributed.prefetch",
    "distributed.batches_per_request", "distributed.weights_poll_frames",
)  # fmt: skip


def flag(path: str) -> str:
    """The command-line flag of a config field path: learner.batch_size → --learner.batch-size."""
    return "--" + path.replace("_", "-")


def _leaves(config, prefix: str = "") -> dict[str, object]:
    """Field path → value, descending into nested configs."""
    leaves = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        path = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(value) and path not in INVOCATION_FIELDS:
            leaves.update(_leaves(value, path + "."))
        else:
            leaves[path] = value
    return leaves


def _refuse_ray_only_options(config: TrainConfig) -> None:
    given = _leaves(config)
    default = _leaves(TrainConfig())
    bad = [path for path in _RAY_ONLY_FIELDS if given[path] != default[path]]
    if config.distributed.num_actors not in (None, 1):
        bad.insert(0, "distributed.num_actors")
    if bad:
        names = ", ".join(f"{flag(path)} ({given[path]!r})" for path in bad)
        raise ValueError(
            f"{names}: only the Ray backend has this; --serial runs one actor, one replay and "
            "the learner in this process, without Redis or Ray"
        )


@dataclasses.dataclass(frozen=True)
class PreparedRun:
    """What `mario train` runs: the config in force, its directory, the checkpoint to resume."""

    config: TrainConfig
    run_dir: pathlib.Path
    checkpoint: dict | None = None
    """The loaded checkpoint when resuming or branching (None: a new run)."""
    branched_from: pathlib.Path | None = None
    """The parent run of a branch (its checkpoint is `checkpoint`)."""


def given_fields(args: list[str]) -> set[str]:
    """The config field paths a command line sets: ["--learner.batch-size", "64", "--no-serial"]
    → {"learner.batch_size", "serial"} (tyro's `--no-` form of a boolean counts as given)."""
    paths = set()
    for arg in args:
        if not arg.startswith("--"):
            continue
        group, _, name = arg[2:].split("=", 1)[0].replace("_", "-").rpartition(".")
        name = name.removeprefix("no-")
        paths.add(f"{group}.{name}".lstrip(".").replace("-", "_"))
    return paths


def prepare_run(requested: TrainConfig, given: set[str] | None = None) -> PreparedRun:
    """Resolves the run directory; on --resume loads the checkpoint and takes the saved config.

    `given`: the field paths set on the command line (given_fields); None counts every value
    that differs from its default as given.

    Raises:
        ValueError: a --run-dir that holds a checkpoint without --resume(-existing), or
            command-line settings that contradict the saved run (each named with both values).
        CheckpointError: a checkpoint that cannot be read.
    """
    existing = requested.run_dir is not None and holds_checkpoint(requested.run_dir)
    if requested.resume is None and existing:
        if not requested.resume_existing:
            raise ValueError(
                f"run_dir {requested.run_dir} already holds a checkpoint: continue it with "
                f"--resume {requested.run_dir} (or --resume-existing), or pick another --run-dir"
            )
        # a branch already made goes on as a resume; its parent is not read again
        requested = dataclasses.replace(requested, resume=requested.run_dir, branch_from=None)
    if requested.resume is None and requested.branch_from is not None:
        return _branch(requested, given)
    if requested.resume is None:
        check_min_size_reachable(requested)  # a new run's; a saved run keeps what it had
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        return PreparedRun(requested, requested.run_dir or pathlib.Path("runs") / stamp)
    run_dir = pathlib.Path(requested.resume)
    if run_dir.is_file():
        raise ValueError(f"resume ({run_dir}) must be a run directory, not a file (the run: "
                         f"--resume {run_dir.parent})")  # fmt: skip
    checkpoint = load_checkpoint(run_dir)
    saved = _saved_config(checkpoint)
    _check_no_contradiction(requested, saved, run_dir, given)
    config = dataclasses.replace(_with_invocation(saved, requested), run_dir=run_dir)
    config = _keep_budget(config, checkpoint, given)
    mode = "serial" if config.serial else "Ray"
    steps = checkpoint["counters"]["env_steps"]
    logger.info("resuming run %s (%s backend) at %s env steps", run_dir, mode, steps)
    return PreparedRun(config, run_dir, checkpoint)


def _keep_budget(config: TrainConfig, checkpoint: dict, given: set[str] | None) -> TrainConfig:
    """A resume without --total-env-steps keeps the run's own budget (not the default's)."""
    if given is None:
        given = (
            {"total_env_steps"} if config.total_env_steps != TrainConfig.total_env_steps else set()
        )
    saved = checkpoint["config"].get("total_env_steps")
    if "total_env_steps" in given or not isinstance(saved, int) or saved < 1:
        return config  # runs saved without one (none so far) take the command line's
    return dataclasses.replace(config, total_env_steps=saved)


def check_min_size_reachable(config: TrainConfig) -> None:
    """Refuses a --replay.min-size-to-sample too close to the size the replay settles at.

    A chunk of L transitions carries L + stack − 1 + n frames (one more at an episode's end, up
    to `stack` more after no-ops): beyond the replay's frame slots (capacity ×
    frames_per_transition + 64), transitions are evicted for their frames, and the table settles
    below its capacity; sampling waits whenever the table is below min_size_to_sample.

    Raises:
        ValueError: naming the value and the size it must leave a margin below.
    """
    replay, length, stack = config.replay, config.actor.chunk_length, config.env.frame_stack
    frames_per_chunk = length + stack + config.actor.n_step + (stack if config.env.noop_max else 0)
    reachable = min(replay.capacity, replay.frame_slots * length // frames_per_chunk)
    if replay.min_size_to_sample > 0.9 * reachable:
        raise ValueError(
            f"replay.min_size_to_sample ({replay.min_size_to_sample}) must be at most 90% of the "
            f"{reachable:,} transitions the replay settles at (replay.capacity {replay.capacity}, "
            f"frames_per_transition {replay.frames_per_transition}: {replay.frame_slots:,} "
            f"frame slots, chunks of {length} "
            f"transitions with up to {frames_per_chunk} frames), or sampling stalls whenever "
            "evictions take the table below it"
        )


# What a branch cannot change: the weights' shapes, the mode, the replay's layout and its rate
# limiter's balance (restored from the snapshot: a new samples-per-insert against the parent's
# counts would stall the learner or the actors for as long as the parent ran).
BRANCH_FIXED = ("network.", "env.action_set", "env.frame_stack", "serial",
                "distributed.num_shards", "replay.capacity", "replay.frames_per_transition",
                "replay.samples_per_insert", "replay.min_size_to_sample",
                "replay.rate_error_buffer")  # fmt: skip
# Changes a branch allows but whose replay still holds the parent's returns for a while (about
# one replay's worth of env steps): logged as a warning.
BRANCH_STALE_REPLAY = ("env.reward", "env.reward_scale", "env.flag_bonus", "env.stuck_",
                       "actor.gamma", "actor.n_step")  # fmt: skip
# Files of the parent's history a branch starts from (copied; the parent is not changed).
BRANCH_HISTORY = ("metrics.jsonl", "invocations.jsonl", BEST_NAME)
# Changes after which the parent's best evaluation is not comparable (not inherited); the
# interval between rounds and the online net played beside an average are not among them.
BRANCH_NEW_EVAL = ("env.level", "eval.")
BRANCH_SAME_EVAL = ("eval.every_env_steps", "eval.compare_online")  # the rounds stay comparable


def _branch(requested: TrainConfig, given: set[str] | None) -> PreparedRun:
    """A new run in --run-dir from the parent's newest whole checkpoint set, with the given
    settings changed. The branch gets a set of its own at once (its checkpoint.pt with the new
    config, the replay snapshots hard-linked), so it neither depends on the parent afterwards
    nor branches again if restarted before its first checkpoint."""
    parent = pathlib.Path(requested.branch_from)
    if not parent.is_dir():
        raise ValueError(f"branch_from ({parent}) must be a run directory")
    checkpoint = load_checkpoint(parent)
    saved = _saved_config(checkpoint)
    kept, changes = _leaves(saved), _given_changes(requested, saved, given)
    fixed = [path for path in changes if path.startswith(BRANCH_FIXED)]
    if fixed:
        raise ValueError(
            f"--branch-from {parent}: a branch keeps the parent's weights, mode and replay; "
            + "; ".join(
                f"{flag(p)}: the parent has {kept[p]!r}, the command line says {changes[p]!r}"
                for p in fixed
            )
            + " (start a new run instead)"
        )
    steps = int(checkpoint["counters"]["env_steps"])
    if requested.total_env_steps <= steps:
        raise ValueError(
            f"total_env_steps ({requested.total_env_steps}) must exceed the parent's "
            f"{steps} env steps: a branch goes on counting from them"
        )
    run_dir = pathlib.Path(requested.run_dir)
    config = dataclasses.replace(_with_invocation(_replace_leaves(saved, changes), requested),
                                 run_dir=run_dir)  # fmt: skip
    new_eval = any(path.startswith(BRANCH_NEW_EVAL) and path not in BRANCH_SAME_EVAL
                   for path in changes)  # fmt: skip
    set_dir = pathlib.Path(checkpoint.pop(SET_DIR_KEY))
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in BRANCH_HISTORY:
        source = parent / name
        (run_dir / name).unlink(missing_ok=True)  # an earlier attempt's, if it died half-way
        if source.is_file() and not (name == BEST_NAME and (new_eval or _newer(source, steps))):
            (run_dir / name).write_bytes(source.read_bytes())
    if not (run_dir / BEST_NAME).is_file():
        # not comparable (new_eval), or the parent's best.pt is from after the checkpoint: the
        # checkpoint's best evaluation has no weights here, so the branch starts without one
        checkpoint["trainer"] = {**checkpoint.get("trainer", {}), "best_eval": None}
    every = config.eval.every_env_steps
    if "eval.every_env_steps" in changes and every:  # the next round on the branch's own grid
        checkpoint["trainer"] = {**checkpoint.get("trainer", {}),
                                 "next_eval_at": (steps // every + 1) * every}  # fmt: skip
    manifest = set_dir / MANIFEST_NAME
    if manifest.is_file():
        snapshots = [n for n in json.loads(manifest.read_text())["files"] if n != CHECKPOINT_NAME]
    else:  # a run from before the manifests
        snapshots = sorted(path.name for path in set_dir.glob("replay-*.npz"))
    for name in snapshots:
        link_or_copy(set_dir / name, run_dir / name)
    checkpoint.pop("format", None)
    if not config.learner.averaged:  # the parent's average is not this branch's policy
        checkpoint["learner"].pop("ema", None)
    save_checkpoint(run_dir, {**checkpoint, "config": config_to_dict(config)})
    write_manifest(run_dir, [CHECKPOINT_NAME, *snapshots], steps)
    changed = [f"{flag(path)} {kept[path]!r} -> {value!r}" for path, value in changes.items()]
    logger.info("branching run %s from %s at %s env steps; changed: %s", run_dir, parent, steps,
                ", ".join(changed) or "nothing")  # fmt: skip
    if any(path.startswith("learner.learning_rate") for path in changes):
        updates = int(checkpoint["learner"]["updates"])
        note = unchanged_step_size(saved.learner, config.learner, updates)
        if note:
            logger.warning("%s", note)
    stale = [flag(path) for path in changes if path.startswith(BRANCH_STALE_REPLAY)]
    if stale:
        logger.warning("%s changed: the replay holds the parent's returns until it turns over "
                       "(%s transitions)", ", ".join(stale), config.replay.capacity)  # fmt: skip
    return PreparedRun(config, run_dir, load_checkpoint(run_dir), branched_from=parent.resolve())


def unchanged_step_size(saved: LearnerConfig, new: LearnerConfig, updates: int) -> str | None:
    """Why a branch's learning-rate flags change nothing from here on (None: they do). Past its
    decay start the step size is learning_rate_final, whatever learning_rate says."""
    # Both schedules are linear between their breakpoints (a step is a breakpoint b with its
    # value before at b - 1) and constant after the last: equal there, equal everywhere.
    starts = [c.learning_rate_decay_start for c in (saved, new)]
    breaks = starts + [c.learning_rate_decay_start + c.learning_rate_decay_updates
                       for c in (saved, new)]  # fmt: skip
    points = {updates, max(breaks) + 1}
    points |= {u for edge in breaks for u in (edge - 1, edge) if u >= updates}
    if any(saved.learning_rate_at(u) != new.learning_rate_at(u) for u in points):
        return None
    return (
        f"the learning-rate flags change nothing from update {updates} on: the step size stays "
        f"{new.learning_rate_at(updates):g} (past learning_rate_decay_start it is "
        f"learning_rate_final; change --learner.learning-rate-final instead)"
    )


def _newer(best: pathlib.Path, steps: int) -> bool:
    """Whether a best.pt comes from after `steps` (its parent fell back to a previous set)."""
    try:
        return int(load_checkpoint(best)["counters"]["env_steps"]) > steps
    except (CheckpointError, KeyError, TypeError, ValueError):
        return True


def _replace_leaves(config, changes: dict[str, object]):
    """`config` with each field path in `changes` ("env.sticky_action_prob") set to its value."""
    top: dict[str, object] = {}
    for path, value in changes.items():
        name, _, rest = path.partition(".")
        if not rest:
            top[name] = value
    for name in {path.split(".")[0] for path in changes if "." in path}:
        prefix = name + "."
        inner = {p.removeprefix(prefix): v for p, v in changes.items() if p.startswith(prefix)}
        top[name] = _replace_leaves(getattr(config, name), inner)
    return dataclasses.replace(config, **top)


def _saved_config(checkpoint: dict) -> TrainConfig:
    """The run's saved config, less this invocation's top-level fields (_with_invocation puts
    the command line's in): a check added since the run was saved cannot refuse what it held
    there (e.g. --ray-head-cpus without --ray-head-port, once ignored)."""
    data = {name: value for name, value in checkpoint["config"].items()
            if name not in INVOCATION_FIELDS}  # fmt: skip
    return config_from_dict(TrainConfig, data, "checkpoint config")


def _with_invocation(saved: TrainConfig, requested: TrainConfig) -> TrainConfig:
    """The saved run's config with this invocation's fields (INVOCATION_FIELDS) replaced."""
    top = {name: getattr(requested, name) for name in INVOCATION_FIELDS if "." not in name}
    for group in {name.split(".")[0] for name in INVOCATION_FIELDS if "." in name}:
        fields = {name.split(".")[1] for name in INVOCATION_FIELDS if name.startswith(group + ".")}
        asked = getattr(requested, group)
        top[group] = dataclasses.replace(
            getattr(saved, group), **{name: getattr(asked, name) for name in fields}
        )
    return dataclasses.replace(saved, **top)


def _given_changes(
    requested: TrainConfig, saved: TrainConfig, given: set[str] | None
) -> dict[str, object]:
    """Training settings (field path → value) given on the command line that differ from the
    saved run's. `given` None (programmatic calls): what differs from the defaults is given."""
    values, default, kept = _leaves(requested), _leaves(TrainConfig()), _leaves(saved)
    if given is None:
        given = {path for path, value in values.items() if value != default[path]}
    return {
        path: values[path]
        for path in sorted(given)
        if path in values and path not in INVOCATION_FIELDS and values[path] != kept[path]
    }


def _check_no_contradiction(
    requested: TrainConfig, saved: TrainConfig, run_dir: pathlib.Path, given: set[str] | None
) -> None:
    """A training setting given on the command line must agree with the saved run."""
    kept = _leaves(saved)
    conflicts = [
        f"{flag(path)}: the run has {kept[path]!r}, the command line says {value!r}"
        for path, value in _given_changes(requested, saved, given).items()
    ]
    if conflicts:
        raise ValueError(
            f"--resume {run_dir} continues the run with its saved settings; "
            + "; ".join(conflicts)
            + " (drop these flags, or start a new run)"
        )
