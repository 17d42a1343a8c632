"""`mario churn`: how much a run's greedy policy changes from one kept round to the next, measured
on fixed states, and how close its best two actions are.

The greedy rounds of one run swing (default-5: 10 of 10 flags at 800k env steps, then three
rounds of 4). A likely cause is policy churn (Schaul et al. 2022): small updates reorder nearly
equal Q-values. Flags of 10 episodes per round show it only roughly. This measures it without
playing: a fixed set of states drawn uniformly from a run's replay snapshot (shard 0 of its
newest checkpoint set), each kept round's Q-values on them, and per round the share of states
whose greedy action differs from the previous kept round's, the action gap (best minus
second-best Q) and the share of states whose gap is under `--small-gap`. Levers meant to steady
the greedy policy (an average of the weights, Advantage Learning) should show less churn or
wider gaps; that is a mechanism, not a flag count, and the states are those the run's own
recent policy visited.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
import torch
import tyro

from common.config import config_from_dict
from common.networks import build_network
from launch.model import load_policy
from launch.trainer import replay_snapshot_path
from learner.checkpoint import SET_DIR_KEY, CheckpointError, kept_rounds, load_checkpoint
from replay_server.replay import PrioritizedReplay, ReplayConfig, SnapshotError

CHURN_FILE = "churn.json"
FORWARD_BATCH = 256


@dataclasses.dataclass(frozen=True)
class ChurnConfig:
    """Greedy-action changes between a run's kept rounds, on fixed states from its replay."""

    run_dir: tyro.conf.Positional[pathlib.Path]
    """A run directory whose `eval/` holds round weights (round-<env steps>.pt)."""
    states: int = 2048
    """States drawn uniformly, without replacement, from the replay snapshot."""
    seed: int = 0
    """Seed of that draw."""
    states_from: pathlib.Path | None = None
    """The run directory whose replay snapshot gives the states (default: run_dir): two runs
    measured on the same states compare directly."""
    since: int = 0
    """Only the rounds at or after this many env steps."""
    small_gap: float = 0.1
    """A state whose best two Q-values are closer than this counts as nearly tied (rewards are
    scaled by --env.reward-scale: 0.1 by default, so 0.1 is one unscaled reward point)."""
    out: pathlib.Path | None = None
    """The JSON of the result (default: <run dir>/eval/churn.json)."""

    def __post_init__(self) -> None:
        if self.states < 1:
            raise ValueError(f"states ({self.states}) must be >= 1")
        if self.seed < 0:
            raise ValueError(f"seed ({self.seed}) must be >= 0")
        if self.small_gap <= 0:
            raise ValueError(f"small_gap ({self.small_gap}) must be > 0")
        if self.out is not None and self.out.suffix != ".json":
            raise ValueError(f"out {self.out} does not end in .json: give the path of the JSON")
        for name in ("run_dir", "states_from"):
            path = getattr(self, name)
            if path is not None and not path.is_dir():
                raise ValueError(f"{name} is not a run directory: {path}")


def fixed_states(run_dir: pathlib.Path, count: int, seed: int) -> np.ndarray:
    """`count` observations [count, stack, 84, 84] (uint8) drawn uniformly from the replay
    snapshot of shard 0 in the run's newest checkpoint set (restored whole: about 1.6 GB at
    its peak for a replay of 100,000 transitions).

    Raises:
        ValueError (CheckpointError among them): naming the file that is missing or cannot be
            read, or a snapshot that holds fewer than `count` transitions.
    """
    checkpoint = load_checkpoint(run_dir)
    config = checkpoint["config"]
    path = replay_snapshot_path(pathlib.Path(checkpoint[SET_DIR_KEY]), 0)
    replay_config = config_from_dict(ReplayConfig, config["replay"], f"{run_dir} config.replay")
    if not path.is_file():
        raise ValueError(f"no replay snapshot at {path} (a run trained with "
                         "--no-snapshot-replay keeps none): give --states-from a run "
                         "that has one")  # fmt: skip
    replay = PrioritizedReplay(replay_config, stack=int(config["env"]["frame_stack"]))
    try:
        replay.restore(path)
    except SnapshotError as error:
        raise ValueError(str(error)) from error
    stored = np.flatnonzero(replay.keys >= 0)
    if len(stored) < count:
        raise ValueError(f"states ({count}): the replay snapshot {path} holds only "
                         f"{len(stored)} transitions")  # fmt: skip
    slots = np.sort(np.random.default_rng(seed).choice(stored, count, replace=False))
    return replay.frames[replay.obs_ids[slots] % replay.frame_capacity]


def q_values(path: pathlib.Path, states: np.ndarray) -> np.ndarray:
    """The round's Q-values on `states` [N, A] (the weights it was evaluated with: the average
    of the weights in a run that keeps one).

    Raises:
        ValueError: the states' frame stack is not the one the round's net takes.
    """
    policy = load_policy(path)
    if states.shape[1] != policy.env.frame_stack:
        raise ValueError(f"{path} takes {policy.env.frame_stack} stacked frames; the states have "
                         f"{states.shape[1]} (--states-from a run of another stack)")  # fmt: skip
    network = build_network(policy.network, policy.env.num_actions, policy.env.frame_stack)
    network.load_state_dict(policy.weights)
    network.eval()
    with torch.no_grad():
        batches = [network(torch.from_numpy(states[i : i + FORWARD_BATCH]))
                   for i in range(0, len(states), FORWARD_BATCH)]  # fmt: skip
    return torch.cat(batches).double().numpy()


def round_row(q: np.ndarray, previous: np.ndarray | None, small_gap: float) -> dict:
    """One round's numbers from its Q-values [N, A] and the previous round's (None: the first):
    the share of states whose greedy action changed, the action gap's mean and median, the
    share of gaps under `small_gap`, and the mean of max_a Q."""
    top_two = np.sort(q, axis=1)[:, -2:]
    gap = top_two[:, 1] - top_two[:, 0]
    changed = None
    if previous is not None:
        changed = float(np.mean(q.argmax(axis=1) != previous.argmax(axis=1)))
    return {
        "greedy_changed": changed,
        "gap_mean": float(gap.mean()),
        "gap_median": float(np.median(gap)),
        "small_gap_share": float(np.mean(gap < small_gap)),
        "max_q_mean": float(top_two[:, 1].mean()),
    }


def churn(config: ChurnConfig) -> dict:
    """Every kept round at or after `since`, oldest first, on one fixed set of states; writes
    the JSON and returns it. A round file that cannot be read is left out (named in the
    result's "left_out"); the change is then counted against the round before it.

    Raises:
        ValueError: the run kept no usable round weights after `since` (naming the folder).
    """
    rounds = {steps: path for steps, path in kept_rounds(config.run_dir).items()
              if steps >= config.since}  # fmt: skip
    if not rounds:
        raise ValueError(f"{config.run_dir / 'eval'} holds no round weights (round-*.pt) at or "
                         f"after {config.since} env steps")  # fmt: skip
    source = config.states_from or config.run_dir
    states = fixed_states(source, config.states, config.seed)
    rows, previous, left_out = [], None, {}
    for steps, path in rounds.items():
        try:
            q = q_values(path, states)
            summary = load_checkpoint(path).get("eval") or {}
        except CheckpointError as error:
            left_out[str(path)] = str(error)
            continue
        rows.append({"env_steps": steps, "flag_rate": summary.get("flag_rate"),
                     **round_row(q, previous, config.small_gap)})  # fmt: skip
        previous = q
    if not rows:
        raise ValueError(f"no usable round file: {next(iter(left_out.values()))}")
    changes = [row["greedy_changed"] for row in rows[1:]]
    result = {
        "run_dir": str(config.run_dir),
        "states_from": str(source),
        "states": config.states,
        "seed": config.seed,
        "small_gap": config.small_gap,
        "rounds": rows,
        "left_out": left_out,
        "mean_greedy_changed": float(np.mean(changes)) if changes else None,
        "mean_gap_median": float(np.mean([row["gap_median"] for row in rows])),
        "mean_small_gap_share": float(np.mean([row["small_gap_share"] for row in rows])),
    }
    out = config.out or config.run_dir / "eval" / CHURN_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    result["out"] = str(out)
    return result
