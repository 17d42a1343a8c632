"""Greedy evaluation with the randomness the emulator lacks (sticky actions, no-op starts).

`Evaluator` plays K episodes of given weights and summarises them; `mario eval RUN` uses it on a
checkpoint (the run's best weights unless --last), and the Trainer every
--eval.every-env-steps on the latest weights (inline in serial mode, in a Ray worker otherwise).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import statistics

import imageio.v2 as imageio
import numpy as np
import torch
import tyro

from common.config import EnvConfig, NetworkConfig
from common.mario_env import make_env
from common.networks import build_network
from launch.model import is_model_dir, load_policy

logger = logging.getLogger("eval")
VIDEO_FPS = 15  # one frame per agent step (4 emulator frames at 60 Hz)
# Evaluation episodes are seeded from here on, far from the seeds training envs use
# (seed·100,003 + env index), so no evaluation replays a training episode's randomness.
EVAL_SEED_BASE = 1_000_000_000


@dataclasses.dataclass(frozen=True)
class TrainEvalConfig:
    """Evaluation during training."""

    every_env_steps: int = 50_000
    """Evaluate the latest weights every this many env steps (0: never)."""
    episodes: int = 10
    """Greedy episodes per evaluation; their seeds change every round."""
    sticky_action_prob: float = 0.25
    """Per-frame probability that the previous action repeats."""
    noop_max: int = 30
    """Random number of no-op steps (0..noop_max) at the start of each episode."""
    keep_weights: bool = True
    """Keep each round's weights as eval/round-<env steps, 9 digits>.pt (round-001500072.pt;
    3.3 MB at the default network): a round can be evaluated with more episodes afterwards and
    exported (`mario export --round`); ten episodes rank the rounds only roughly."""
    compare_online: bool = False
    """With --learner.ema-decay (rounds play the average of the weights): also play the online
    net on the same seeds each round, logged as eval_online/*, to compare the two."""

    def __post_init__(self) -> None:
        if self.every_env_steps < 0:
            raise ValueError(f"every_env_steps ({self.every_env_steps}) must be >= 0 (0: off)")
        if self.episodes < 1:
            raise ValueError(f"episodes ({self.episodes}) must be >= 1")
        if not 0 <= self.sticky_action_prob < 1:
            raise ValueError(f"sticky_action_prob ({self.sticky_action_prob}) must be in [0, 1)")
        if self.noop_max < 0:
            raise ValueError(f"noop_max ({self.noop_max}) must be >= 0")

    def env(self, train_env: EnvConfig) -> EnvConfig:
        """The training env with the evaluation's randomness."""
        return dataclasses.replace(
            train_env, sticky_action_prob=self.sticky_action_prob, noop_max=self.noop_max
        )

    def seeds(self, round_index: int) -> list[int]:
        """The episode seeds of evaluation round `round_index`: new ones every round."""
        first = EVAL_SEED_BASE + round_index * self.episodes
        return list(range(first, first + self.episodes))


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluate a run (its best weights) or a checkpoint on Mario with sticky actions."""

    checkpoint: tyro.conf.Positional[pathlib.Path]
    """A model folder (`mario export`), a run directory (its best.pt, else checkpoint.pt), or a
    .pt checkpoint file."""
    last: bool = False
    """Evaluate the run's last checkpoint instead of its best weights."""
    online: bool = False
    """Of a checkpoint that keeps an average of the weights (--learner.ema-decay), play the
    online net instead of the average (round files and best.pt hold only the average)."""
    episodes: int = 10
    """Episodes to play."""
    level: str | None = None
    """Level(s) to play (default: the level the checkpoint was trained on)."""
    sticky_action_prob: float = 0.25
    """Per-frame probability that the previous action repeats."""
    noop_max: int = 30
    """Random number of no-op steps (0..noop_max) at the start of each episode."""
    epsilon: float = 0.0
    """Probability of a random action per step."""
    constant_action: int | None = None
    """Play this action (an index into the checkpoint's action set) at every step instead of the
    network's choice: the floor a learned policy has to beat. On 1-1 with right_jump, 1
    (right+A, a jump whenever Mario lands) reaches the flag in some episodes by itself."""
    max_episode_steps: int | None = None
    """Step cap (default: the checkpoint's)."""
    seed: int = 1000
    """Seed of episode i is seed + i."""
    video_all: bool = False
    """Write an mp4 of every episode (default: only the best one)."""
    out: pathlib.Path | None = None
    """Folder for videos and eval.json (default: <run dir>/eval; for a model folder
    runs/eval/<its name>, since its own eval/ is the evaluation its card records)."""

    def __post_init__(self) -> None:
        if self.episodes < 1:
            raise ValueError(f"episodes ({self.episodes}) must be >= 1")
        if not 0 <= self.epsilon <= 1:
            raise ValueError(f"epsilon ({self.epsilon}) must be in [0, 1]")
        if self.max_episode_steps is not None and self.max_episode_steps < 1:
            raise ValueError(f"max_episode_steps ({self.max_episode_steps}) must be >= 1")
        if self.constant_action is not None and self.constant_action < 0:
            raise ValueError(f"constant_action ({self.constant_action}) must be >= 0")
        if self.seed < 0:
            raise ValueError(f"seed ({self.seed}) must be >= 0")


def play_on_one_thread() -> None:
    """For the commands that only play (eval, pick, export's final evaluation, play): greedy play
    is batch-1 inference of a small net, and torch's default of a thread per core slowed it
    ~9x while a training run held the cores (2 episodes: 108 s against 12 s on one thread,
    2026-11-27). The evaluator during training sets the same (ray_backend.EvalWorker)."""
    torch.set_num_threads(1)


def _writer(path: pathlib.Path):
    return imageio.get_writer(path, fps=VIDEO_FPS, codec="libx264", macro_block_size=16)


class Evaluator:
    """Plays episodes of given weights on one env; summarises them; re-records the best."""

    def __init__(
        self,
        env_config: EnvConfig,
        network_config: NetworkConfig,
        constant_action: int | None = None,
    ):
        """`constant_action`: played at every step instead of the network's choice."""
        self.env_config = env_config
        self.constant_action = constant_action
        self.env = make_env(env_config)
        self.network = build_network(
            network_config, env_config.num_actions, env_config.frame_stack
        ).eval()

    def play(self, seed: int, epsilon: float = 0.0, writer=None) -> dict:
        """One episode. It depends only on the weights, the seed and ε (the env, its sticky
        actions and no-ops, and the ε draws are all seeded by `seed`), so it can be re-played."""
        env, rng = self.env, np.random.default_rng(seed)
        obs, info = env.reset(seed=seed)
        episode_return, length, max_x = 0.0, 0, info["x_pos"]
        if writer is not None:
            writer.append_data(env.render())
        while True:
            if epsilon and rng.random() < epsilon:
                action = int(rng.integers(env.action_space.n))
            elif self.constant_action is not None:
                action = self.constant_action
            else:
                with torch.inference_mode():
                    q = self.network(torch.from_numpy(np.ascontiguousarray(obs))[None])
                action = int(q.argmax(dim=1))
            obs, reward, terminated, truncated, info = env.step(action)
            episode_return += reward
            length += 1
            max_x = max(max_x, info["x_pos"])
            if writer is not None:
                writer.append_data(env.render())
            if terminated or truncated:
                break
        result = {
            "seed": seed,
            "return": episode_return,
            "length": length,
            "max_x_pos": max_x,
            "flag_get": bool(info["flag_get"]),
            "level": f"{info['world']}-{info['stage']}",
        }
        return result

    def run(self, weights: dict, seeds: list[int], epsilon: float = 0.0) -> dict:
        """Plays one episode per seed with `weights`; returns the summary (see summarize)."""
        self.network.load_state_dict(weights)
        return summarize([self.play(seed, epsilon) for seed in seeds])

    def record(
        self, weights: dict, episode: dict, path: pathlib.Path, epsilon: float = 0.0
    ) -> None:
        """Re-plays an episode that run() played (same weights, seed and ε) into an mp4, so
        no frames are kept in memory while evaluating.

        Raises:
            RuntimeError: if the replay diverged from the episode (the video would be wrong).
        """
        self.network.load_state_dict(weights)
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = _writer(path)
        try:
            replayed = self.play(episode["seed"], epsilon, writer=writer)
        finally:
            writer.close()
        if replayed != episode:
            raise RuntimeError(f"replaying episode seed {episode['seed']} diverged: {replayed}")

    def close(self) -> None:
        self.env.close()


def eval_rank(flag_rate: float, x_pos_mean: float) -> tuple[float, float]:
    """How evaluations compare: by flag rate, then by mean max x_pos."""
    return (flag_rate, x_pos_mean)


def evaluate_round(
    evaluator: Evaluator,
    weights: dict,
    seeds: list[int],
    best_rank: tuple[float, float] | None,
    video_path: pathlib.Path,
    online: dict | None = None,
) -> dict:
    """One evaluation round during training: Evaluator.run's summary; when it beats
    `best_rank`, its best episode is re-played into `video_path` (the summary's "video").
    `online`: the online net's weights when `weights` are their average (--eval.compare-online),
    played on the same seeds too; their summary is the result's "online"."""
    result = evaluator.run(weights, seeds)
    if online is not None:
        result["online"] = evaluator.run(online, seeds)
    result["video"] = None
    if best_rank is None or eval_rank(result["flag_rate"], result["max_x_pos_mean"]) > best_rank:
        try:
            evaluator.record(weights, result["per_episode"][result["best_episode"]], video_path)
            result["video"] = str(video_path)
        except Exception as error:  # a video must never cost the evaluation or the run
            logger.warning("no video of the best episode: %s", error)
    return result


def summarize(episodes: list[dict]) -> dict:
    """Flag rate, mean/median/max of max x_pos, mean return and length, the best episode."""
    x_positions = [e["max_x_pos"] for e in episodes]
    ranks = [(e["flag_get"], e["max_x_pos"], e["return"]) for e in episodes]
    best = max(range(len(episodes)), key=ranks.__getitem__)
    return {
        "episodes": len(episodes),
        "flag_rate": float(np.mean([e["flag_get"] for e in episodes])),
        "max_x_pos_mean": float(np.mean(x_positions)),
        "max_x_pos_median": float(statistics.median(x_positions)),
        "max_x_pos_max": int(max(x_positions)),
        "return_mean": float(np.mean([e["return"] for e in episodes])),
        "length_mean": float(np.mean([e["length"] for e in episodes])),
        "best_episode": best,
        "per_episode": episodes,
    }


def evaluate(config: EvalConfig) -> dict:
    """`mario eval`: plays the episodes and writes eval.json plus the videos.

    Returns:
        Summary statistics, per-episode results and video paths.
    """
    play_on_one_thread()
    policy = load_policy(config.checkpoint, config.last, config.online)
    env_config, network_config = policy.env, policy.network
    env_config = dataclasses.replace(
        env_config,
        level=config.level or env_config.level,
        sticky_action_prob=config.sticky_action_prob,
        noop_max=config.noop_max,
        max_episode_steps=config.max_episode_steps or env_config.max_episode_steps,
    )
    if config.constant_action is not None and config.constant_action >= env_config.num_actions:
        raise ValueError(f"constant_action ({config.constant_action}) is not an action of "
                         f"{env_config.action_set} (0..{env_config.num_actions - 1})")  # fmt: skip
    model_path = pathlib.Path(config.checkpoint)
    out = config.out or (model_path if model_path.is_dir() else model_path.parent) / "eval"
    if config.out is None and is_model_dir(model_path):
        out = pathlib.Path("runs") / "eval" / model_path.resolve().name
    out.mkdir(parents=True, exist_ok=True)
    evaluator = Evaluator(env_config, network_config, config.constant_action)
    weights = policy.weights
    seeds = [config.seed + index for index in range(config.episodes)]
    try:
        summary = evaluator.run(weights, seeds, config.epsilon)
        episodes = summary["per_episode"]
        if config.video_all:
            videos = [out / f"episode_{index:03d}.mp4" for index in range(len(episodes))]
        else:
            episodes, videos = [episodes[summary["best_episode"]]], [out / "best_episode.mp4"]
        for episode, video in zip(episodes, videos, strict=True):
            evaluator.record(weights, episode, video, config.epsilon)
    finally:
        evaluator.close()
    summary = {
        "checkpoint": str(policy.source),
        "env_steps_trained": policy.env_steps,
        "level": env_config.level,
        "reward": env_config.reward,
        "sticky_action_prob": config.sticky_action_prob,
        "noop_max": config.noop_max,
        "epsilon": config.epsilon,
        "action_set": env_config.action_set,
        "constant_action": config.constant_action,
        **summary,
        "videos": [str(video) for video in videos],
    }
    (out / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
