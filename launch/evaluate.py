"""`mario eval CHECKPOINT`: greedy (or ε) episodes with sticky actions; stats and mp4 videos."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import statistics

import imageio.v2 as imageio
import numpy as np
import torch
import tyro

from common.config import EnvConfig, NetworkConfig, config_from_dict
from common.mario_env import make_env
from common.networks import build_network
from learner.checkpoint import load_checkpoint

VIDEO_FPS = 15  # one frame per agent step (4 emulator frames at 60 Hz)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluate a checkpoint on Mario with the evaluation randomness the emulator lacks."""

    checkpoint: tyro.conf.Positional[pathlib.Path]
    """A checkpoint.pt, or a run directory holding one."""
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
    max_episode_steps: int | None = None
    """Step cap (default: the checkpoint's)."""
    seed: int = 1000
    """Seed of episode i is seed + i."""
    video_all: bool = False
    """Write an mp4 of every episode (default: only the best one)."""
    out: pathlib.Path | None = None
    """Folder for videos and eval.json (default: <run dir>/eval)."""

    def __post_init__(self) -> None:
        if self.episodes < 1:
            raise ValueError(f"episodes ({self.episodes}) must be >= 1")
        if not 0 <= self.epsilon <= 1:
            raise ValueError(f"epsilon ({self.epsilon}) must be in [0, 1]")


def _play(
    env,
    network,
    epsilon: float,
    seed: int,
    rng: np.random.Generator,
    writer=None,
    actions: list[int] | None = None,
) -> tuple[dict, list[int]]:
    """One episode; replays `actions` instead of the policy when given (for re-recording)."""
    obs, info = env.reset(seed=seed)
    taken: list[int] = []
    episode_return, length, max_x = 0.0, 0, info["x_pos"]
    if writer is not None:
        writer.append_data(env.render())
    while True:
        if actions is not None:
            action = actions[length]
        elif rng.random() < epsilon:
            action = int(rng.integers(env.action_space.n))
        else:
            with torch.inference_mode():
                q = network(torch.from_numpy(np.ascontiguousarray(obs))[None])
            action = int(q.argmax(dim=1))
        taken.append(action)
        obs, reward, terminated, truncated, info = env.step(action)
        episode_return += reward
        length += 1
        max_x = max(max_x, info["x_pos"])
        if writer is not None:
            writer.append_data(env.render())
        if terminated or truncated:
            break
    result = {
        "return": episode_return,
        "length": length,
        "max_x_pos": max_x,
        "flag_get": bool(info["flag_get"]),
        "level": f"{info['world']}-{info['stage']}",
    }
    return result, taken


def _writer(path: pathlib.Path):
    return imageio.get_writer(path, fps=VIDEO_FPS, codec="libx264", macro_block_size=16)


def evaluate(config: EvalConfig) -> dict:
    """Plays the episodes and writes eval.json plus the videos.

    Returns:
        Summary statistics, per-episode results and video paths.
    """
    payload = load_checkpoint(config.checkpoint)
    train_config = payload["config"]
    env_config = config_from_dict(EnvConfig, train_config["env"], "checkpoint config.env")
    network_config = config_from_dict(
        NetworkConfig, train_config["network"], "checkpoint config.network"
    )
    env_config = dataclasses.replace(
        env_config,
        level=config.level or env_config.level,
        sticky_action_prob=config.sticky_action_prob,
        noop_max=config.noop_max,
        max_episode_steps=config.max_episode_steps or env_config.max_episode_steps,
    )
    network = build_network(network_config, env_config.num_actions, env_config.frame_stack)
    network.load_state_dict(payload["learner"]["online"])
    network.eval()
    checkpoint_path = pathlib.Path(config.checkpoint)
    run_dir = checkpoint_path if checkpoint_path.is_dir() else checkpoint_path.parent
    out = config.out or run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    env = make_env(env_config)
    rng = np.random.default_rng(config.seed)
    episodes, action_lists, videos = [], [], []
    for index in range(config.episodes):
        writer = None
        if config.video_all:
            path = out / f"episode_{index:03d}.mp4"
            writer = _writer(path)
            videos.append(str(path))
        result, taken = _play(env, network, config.epsilon, config.seed + index, rng, writer)
        if writer is not None:
            writer.close()
        episodes.append(result)
        action_lists.append(taken)
    best = max(
        range(len(episodes)), key=lambda i: (episodes[i]["max_x_pos"], episodes[i]["return"])
    )
    if not config.video_all:
        # The env is deterministic given its seed and the actions, so replaying the recorded
        # actions re-creates the best episode frame for frame without storing it in memory.
        path = out / "best_episode.mp4"
        writer = _writer(path)
        replayed, _ = _play(env, network, 0.0, config.seed + best, rng, writer, action_lists[best])
        writer.close()
        if replayed["max_x_pos"] != episodes[best]["max_x_pos"]:
            raise RuntimeError("replaying the best episode diverged; the video would be wrong")
        videos.append(str(path))
    env.close()
    x_positions = [e["max_x_pos"] for e in episodes]
    summary = {
        "checkpoint": str(config.checkpoint),
        "env_steps_trained": int(payload["counters"]["env_steps"]),
        "level": env_config.level,
        "reward": env_config.reward,
        "episodes": len(episodes),
        "sticky_action_prob": config.sticky_action_prob,
        "noop_max": config.noop_max,
        "epsilon": config.epsilon,
        "flag_rate": float(np.mean([e["flag_get"] for e in episodes])),
        "max_x_pos_mean": float(np.mean(x_positions)),
        "max_x_pos_median": float(statistics.median(x_positions)),
        "max_x_pos_max": int(max(x_positions)),
        "return_mean": float(np.mean([e["return"] for e in episodes])),
        "length_mean": float(np.mean([e["length"] for e in episodes])),
        "best_episode": best,
        "videos": videos,
        "per_episode": episodes,
    }
    (out / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
