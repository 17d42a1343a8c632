"""`mario pick`: which of a run's evaluation rounds to ship, by more episodes than training gave.

Training evaluates every round with a few greedy episodes (10 by default), which rank rounds
only roughly: one run's rounds swing by several flags. `mario train` keeps each round's weights
(eval/round-<env steps>.pt); this takes the best few by their training evaluation and plays each
with more episodes on seed sets that training never used, then ranks them by flags (then mean
max x) over all of those episodes. `mario export RUN --round N --seed S` ships the winner, its
final evaluation on a seed set other than those that chose it (they flatter the winner).
With --average K each candidate is the mean of the weights of the K kept rounds centred on a
round (ranked by their training evaluations' mean), and `--average K` goes into the export.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import pathlib
import shlex

import tyro

from launch.evaluate import EVAL_SEED_BASE, EvalConfig, eval_rank, evaluate
from launch.model import ExportConfig
from learner.checkpoint import (
    CheckpointError,
    averaged_round,
    check_average,
    kept_rounds,
    load_checkpoint,
    round_window,
    save_checkpoint,
)

PICK_FILE = "pick.json"


@dataclasses.dataclass(frozen=True)
class PickConfig:
    """Evaluates a run's best kept rounds with more episodes and ranks them."""

    run_dir: tyro.conf.Positional[pathlib.Path]
    """A run directory whose `eval/` holds round weights (round-<env steps>.pt)."""
    top: int = 3
    """Rounds to evaluate: the best by their evaluation during training (flag rate, then mean
    max x; the later round first on a tie)."""
    episodes: int = 20
    """Greedy episodes per round and seed set (sticky actions 0.25, 0–30 no-ops)."""
    seeds: tuple[int, ...] = (1000, 2000)
    """First seed of each seed set (episode i of a set plays seed + i); training's evaluation
    rounds use seeds from 1,000,000,000 on, its actors' envs small ones (the run's --seed)."""
    out: pathlib.Path | None = None
    """The JSON of the result (default: <run dir>/eval/pick.json); each evaluation's eval.json
    and best episode go beside it, in a folder named as the JSON without .json
    (pick/round-<env steps>-seed-<seed>/)."""
    average: int = 1
    """Play each candidate as the mean of the weights of this many usable kept rounds centred on
    it (odd; fewer at the run's first and last rounds; 1: the round's own weights). Candidates
    are then ranked by the mean of those rounds' training evaluations; the averaged weights go
    beside the JSON (average-K-<env steps>.pt)."""

    def __post_init__(self) -> None:
        if self.top < 1:
            raise ValueError(f"top ({self.top}) must be >= 1")
        check_average(self.average)
        if self.episodes < 1:
            raise ValueError(f"episodes ({self.episodes}) must be >= 1")
        if not self.seeds:
            raise ValueError("seeds () must name at least one seed set")
        for seed in self.seeds:
            if not 0 <= seed <= EVAL_SEED_BASE - self.episodes:
                raise ValueError(f"seeds: {seed} must be in [0, {EVAL_SEED_BASE - self.episodes}]:"
                                 f" from {EVAL_SEED_BASE} on, the seeds are training's own "
                                 "evaluation rounds'")  # fmt: skip
        if self.out is not None and self.out.is_dir():
            raise ValueError(f"out {self.out} is a directory: give the path of the JSON")
        if self.out is not None and self.out.suffix != ".json":
            raise ValueError(f"out {self.out} does not end in .json: give the path of the JSON "
                             "(the evaluations go in a folder of its name)")  # fmt: skip
        ordered = sorted(self.seeds)
        for first, second in itertools.pairwise(ordered):
            if second - first < self.episodes:
                raise ValueError(f"seeds {self.seeds}: the sets of {self.episodes} episodes "
                                 f"from {first} and {second} overlap")  # fmt: skip


def round_summaries(run_dir: pathlib.Path) -> tuple[list[dict], dict[str, str]]:
    """The rounds whose weights the run kept: path, env steps and the training evaluation's
    flag rate and mean max x, oldest first; and the round files left out (path → why: one that
    cannot be read, or that holds no evaluation summary): one damaged file does not cost the
    others.

    Raises:
        ValueError: the run kept no round weights (naming the folder).
        CheckpointError: no round file is usable (naming the first and why).
    """
    if not run_dir.is_dir():
        raise ValueError(f"run_dir {run_dir} is not a directory")
    paths = list(kept_rounds(run_dir).values())
    if not paths:
        raise ValueError(
            f"{run_dir / 'eval'} holds no round weights (round-*.pt): the run was trained before "
            "rounds were kept or with --eval.no-keep-weights; `mario eval` evaluates its best.pt"
        )
    rounds, left_out = [], {}
    for path in paths:
        try:
            rounds.append(_round_summary(path))
        except CheckpointError as error:
            left_out[str(path)] = str(error)
    if not rounds:
        raise CheckpointError(f"no usable round file: {next(iter(left_out.values()))}")
    return rounds, left_out


def usable_rounds(rounds: list[dict]) -> dict[int, pathlib.Path]:
    """env steps → file of the rounds round_summaries found usable: the rounds a mean is taken
    over, by `pick --average` and by `export --average` alike."""
    return {entry["env_steps"]: pathlib.Path(entry["path"]) for entry in rounds}


def _round_summary(path: pathlib.Path) -> dict:
    """One round file's entry (round_summaries).

    Raises:
        CheckpointError: it cannot be read, or holds no evaluation summary (naming it).
    """
    summary = load_checkpoint(path).get("eval")
    try:
        return {
            "path": str(path),
            "env_steps": int(summary["env_steps"]),
            "train_flag_rate": float(summary["flag_rate"]),
            "train_x_pos_mean": float(summary["x_pos_mean"]),
        }
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(
            f"{path}: no evaluation summary (not a round's weights): {error!r}"
        ) from None


def candidates(rounds: list[dict], top: int, average: int = 1) -> list[dict]:
    """The `top` rounds by their training evaluation (with `average` > 1: the mean of the
    evaluations of the rounds centred on each); a later round first on a tie."""

    def rank(entry: dict) -> tuple:
        flag_rate, x_pos_mean = window_evaluation(rounds, entry["env_steps"], average)
        return (*eval_rank(flag_rate, x_pos_mean), entry["env_steps"])

    return sorted(rounds, key=rank, reverse=True)[:top]


def window_evaluation(rounds: list[dict], centre: int, average: int) -> tuple[float, float]:
    """The mean training flag rate and mean max x of the `average` rounds (round_summaries'
    entries, oldest first) centred on `centre`; rounded, so that means of equal rates tie
    (3 × 0.8 / 3 is 0.8000000000000002).

    Raises:
        ValueError: `average` is even, below 1 or more than there are rounds (naming it).
    """
    steps = [entry["env_steps"] for entry in rounds]
    window = [rounds[steps.index(s)] for s in round_window(steps, centre, average)]
    flag_rate = sum(r["train_flag_rate"] for r in window) / len(window)
    x_pos_mean = sum(r["train_x_pos_mean"] for r in window) / len(window)
    return round(flag_rate, 9), round(x_pos_mean, 6)


def combined(entry: dict, summaries: dict[int, dict], folders: dict[int, pathlib.Path]) -> dict:
    """A candidate round with its evaluations (seed set → `evaluate`'s summary): flags and mean
    max x over all their episodes, and each set's own."""
    episodes = [episode for summary in summaries.values() for episode in summary["per_episode"]]
    per_seed = {
        str(seed): {
            "flags": sum(int(episode["flag_get"]) for episode in summary["per_episode"]),
            "x_pos_mean": summary["max_x_pos_mean"],
            "out": str(folders[seed]),
        }
        for seed, summary in summaries.items()
    }
    return {**entry, "flags": sum(one["flags"] for one in per_seed.values()),
            "episodes": len(episodes),
            "x_pos_mean": sum(episode["max_x_pos"] for episode in episodes) / len(episodes),
            "per_seed": per_seed}  # fmt: skip


def ranked(results: list[dict]) -> list[dict]:
    """Most flags first, then the higher mean max x, then the later round."""
    return sorted(results, key=lambda r: (r["flags"], r["x_pos_mean"], r["env_steps"]),
                  reverse=True)  # fmt: skip


def held_out_seed(seeds: tuple[int, ...], episodes: int, wanted: int) -> int:
    """The first multiple of 1000 from which `wanted` episodes share no seed with the sets that
    chose the round: the winner's final evaluation at export is not played on them."""
    start = 1000
    while any(start < seed + episodes and seed < start + wanted for seed in seeds):
        start += 1000
    return start


def pick(config: PickConfig) -> dict:
    """Evaluates the candidates on every seed set; returns (and writes) them ranked by flags,
    then mean max x, over all their episodes."""
    rounds, left_out = round_summaries(config.run_dir)
    chosen = candidates(rounds, config.top, config.average)
    out = config.out or config.run_dir / "eval" / PICK_FILE
    usable = usable_rounds(rounds)
    results = []
    for entry in chosen:
        name = f"round-{entry['env_steps']:09d}"
        if config.average > 1:  # the mean of the window's weights, written beside the JSON
            name = f"average-{config.average}-{entry['env_steps']:09d}"
            try:
                payload = averaged_round(usable, entry["env_steps"], config.average)
            except CheckpointError as error:  # a round changed since it was read: this one out
                left_out[entry["path"]] = str(error)
                continue
            path = save_checkpoint(out.with_suffix(""), payload, name=f"{name}.pt")
            entry = {**entry, "round_path": entry["path"], "path": str(path),
                     "averaged_rounds": payload["averaged_rounds"],
                     "train_window_flag_rate": window_evaluation(
                         rounds, entry["env_steps"], config.average)[0]}  # fmt: skip
        summaries, folders = {}, {}
        for seed in config.seeds:
            folders[seed] = out.with_suffix("") / f"{name}-seed-{seed}"
            summaries[seed] = evaluate(EvalConfig(
                checkpoint=pathlib.Path(entry["path"]), episodes=config.episodes, seed=seed,
                out=folders[seed],
            ))  # fmt: skip
        results.append(combined(entry, summaries, folders))
    if not results:
        raise CheckpointError(f"no candidate could be averaged: {' '.join(left_out.values())}")
    results = ranked(results)
    export_seed = held_out_seed(config.seeds, config.episodes, ExportConfig.eval_episodes)
    result = {
        "run_dir": str(config.run_dir),
        "episodes_per_seed": config.episodes,
        "seeds": list(config.seeds),
        "ranked": results,
        "left_out": left_out,
        "average": config.average,
        "export": f"mario export {shlex.quote(str(config.run_dir))} "
        f"--round {results[0]['env_steps']}"
        + (f" --average {config.average}" if config.average > 1 else "")
        + f" --seed {export_seed}",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    result["out"] = str(out)
    return result
