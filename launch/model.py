"""A trained agent as a folder of its own, and the commands that use one.

`mario export RUN --out models/smb-1-1` writes:

    model.pt          the weights evaluation played: the average of the weights when the run
                      keeps one (the default), else the online net's (a torch state dict,
                      loaded with weights_only)
    config.json       {"env": …, "network": …}: what the net sees and how it is built
    model_card.json   how it was trained (env steps, updates, wall time, machine, commit, the
                      exact commands, the in-training eval curve) and how it did (final eval)
    README.md         the card in words

`mario eval` and `mario play` take such a folder, a run directory (its best weights unless
--last) or a checkpoint file: `load_policy` reads all three.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import pathlib
import shutil

import imageio.v2 as imageio
import torch
import tyro

from common.config import EnvConfig, NetworkConfig, config_from_dict
from common.networks import build_network
from launch.plots import (
    describe_milestones,
    load_metrics,
    milestones,
    read_jsonl,
    without_lost_work,
)
from learner.checkpoint import (
    BEST_NAME,
    CHECKPOINT_NAME,
    SET_DIR_KEY,
    CheckpointError,
    averaged_round,
    check_average,
    kept_rounds,
    load_checkpoint,
    round_name,
)

logger = logging.getLogger("model")
MODEL_WEIGHTS = "model.pt"
MODEL_CONFIG = "config.json"
MODEL_CARD = "model_card.json"
MAX_WEIGHTS_BYTES = 10 * 2**20  # the shipped model must stay under 10 MB
GIF_FPS = 15  # one frame per agent step (4 emulator frames at 60 Hz)


@dataclasses.dataclass(frozen=True)
class Policy:
    """What playing needs: the env the net was trained on, the net, its weights."""

    env: EnvConfig
    network: NetworkConfig
    weights: dict[str, torch.Tensor]
    source: pathlib.Path
    """The file the weights came from."""
    env_steps: int | None
    """Env steps of training behind the weights (None: not recorded)."""


def is_model_dir(path: pathlib.Path) -> bool:
    return path.is_dir() and (path / MODEL_WEIGHTS).is_file()


def resolve_checkpoint(path: pathlib.Path, last: bool = False) -> pathlib.Path:
    """A run directory's best weights (best.pt) unless `last` or there are none yet; else the
    path as given (a checkpoint file, or a run directory, whose newest whole checkpoint set
    load_checkpoint reads)."""
    path = pathlib.Path(path)
    if path.is_dir() and not last and (path / BEST_NAME).is_file():
        return path / BEST_NAME
    return path


def load_policy(path: pathlib.Path, last: bool = False, online: bool = False) -> Policy:
    """The policy in a model folder, a run directory or a checkpoint file. A checkpoint that
    keeps an average of the weights plays that, unless `online` (its online net).

    Raises:
        CheckpointError: naming the file and what is wrong with it.
    """
    path = pathlib.Path(path)
    if is_model_dir(path):
        return _load_model_dir(path)
    checkpoint = resolve_checkpoint(path, last)
    # a run directory's newest whole set (checked against its manifest; previous/ if torn)
    payload = load_checkpoint(checkpoint)
    if checkpoint.is_dir():
        checkpoint = pathlib.Path(payload[SET_DIR_KEY]) / CHECKPOINT_NAME
    config = payload["config"]
    # A run that keeps an average of its weights plays and ships that: its rounds and best.pt
    # hold it as their weights ("online"), its checkpoints beside the online net ("ema").
    learner = payload["learner"]
    averaged = bool(config.get("learner", {}).get("ema_decay"))
    if online and averaged and "ema" not in learner and "eval" in payload:  # a round, best.pt
        raise CheckpointError(f"{checkpoint} holds only the average of the weights (as a run's "
                              "rounds and best.pt do): its online net is in checkpoint.pt "
                              "(--last)")  # fmt: skip
    weights = learner["ema"] if "ema" in learner and not online else learner["online"]
    return _checked(Policy(
        env=config_from_dict(EnvConfig, config["env"], f"{checkpoint} config.env"),
        network=config_from_dict(NetworkConfig, config["network"], f"{checkpoint} config.network"),
        weights=weights,
        source=checkpoint,
        env_steps=int(payload["counters"]["env_steps"]),
    ))  # fmt: skip


def _checked(policy: Policy) -> Policy:
    """The policy, once its weights are known to fit the network its config describes.

    Raises:
        CheckpointError: naming the file and the first weights that do not fit.
    """
    network = build_network(policy.network, policy.env.num_actions, policy.env.frame_stack)
    try:
        network.load_state_dict(policy.weights)
    except RuntimeError as error:  # missing, unexpected or mis-shaped weights
        first = str(error).strip().splitlines()[:2]
        raise CheckpointError(
            f"the weights in {policy.source} do not fit the network its config describes "
            f"(env.action_set, env.frame_stack, network.*): {' '.join(first)}"
        ) from error
    return policy


def _load_model_dir(path: pathlib.Path) -> Policy:
    config_path, weights_path = path / MODEL_CONFIG, path / MODEL_WEIGHTS
    try:
        config = json.loads(config_path.read_text())
        env = config_from_dict(EnvConfig, config["env"], f"{config_path} env")
        network = config_from_dict(NetworkConfig, config["network"], f"{config_path} network")
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(f"cannot read the model config {config_path}: {error!r}") from error
    try:
        weights = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or foreign files
        raise CheckpointError(f"cannot load model weights {weights_path}: {error}") from error
    if not isinstance(weights, dict) or not all(
        isinstance(v, torch.Tensor) for v in weights.values()
    ):
        raise CheckpointError(f"{weights_path} is not a state dict of tensors")
    card_path = path / MODEL_CARD
    try:
        card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read the model card {card_path}: {error!r}") from error
    return _checked(Policy(
        env=env,
        network=network,
        weights={name: tensor.float() for name, tensor in weights.items()},
        source=weights_path,
        env_steps=card.get("training", {}).get("env_steps"),
    ))  # fmt: skip


# -- export ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """Write a run's best weights (or its last with --last) as a model folder with its card."""

    run: tyro.conf.Positional[pathlib.Path]
    """The run directory."""
    out: pathlib.Path = pathlib.Path("models/smb-1-1")
    """The model folder to write."""
    last: bool = False
    """Export the run's last checkpoint instead of its best evaluation's weights."""
    round: int | None = None
    """Export the weights of the evaluation round at these env steps (eval/round-<env steps,
    9 digits>.pt; the rounds are in `mario plot RUN --table`) instead of the best evaluation's."""
    eval_episodes: int = 20
    """Greedy episodes of the final evaluation recorded in the card (sticky 0.25, 0–30 no-ops;
    0: none)."""
    seed: int = 1000
    """Seed of the final evaluation's first episode."""
    force: bool = False
    """Replace the model folder --out if it is one already (its files and its evaluation)."""
    average: int = 1
    """Ship the mean of the weights of this many usable kept rounds centred on --round (odd;
    fewer at the run's first and last rounds; 1: the round's own; `mario pick --average K`
    ranks such means). The card's training figures stay those of round --round."""

    def __post_init__(self) -> None:
        if self.eval_episodes < 0:
            raise ValueError(f"eval_episodes ({self.eval_episodes}) must be >= 0")
        if self.seed < 0:
            raise ValueError(f"seed ({self.seed}) must be >= 0")
        check_average(self.average)
        if self.average > 1 and self.round is None:
            raise ValueError(f"average ({self.average}) needs --round: the rounds are centred "
                             "on it")  # fmt: skip
        if self.round is not None and self.last:
            raise ValueError(f"round ({self.round}) and last exclude each other: one set of "
                             "weights is exported")  # fmt: skip


def export(config: ExportConfig) -> dict:
    """Writes the model folder; returns its card."""
    from launch.evaluate import EvalConfig, evaluate

    run_dir, out = pathlib.Path(config.run), pathlib.Path(config.out)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} is not a run directory")
    if out.exists() and not out.is_dir():
        raise ValueError(f"out ({out}) is a file, not a model folder")
    if out.is_dir() and any(out.iterdir()):
        if not is_model_dir(out):
            raise ValueError(f"out ({out}) holds files and is not a model folder: pick a new or "
                             "empty --out")  # fmt: skip
        if not config.force:
            raise ValueError(f"out ({out}) is a model folder already: give --force to replace "
                             "it, or pick another --out")  # fmt: skip
    source = run_dir
    if config.round is not None:
        source = run_dir / "eval" / round_name(config.round)
        if not source.is_file():
            kept = list(kept_rounds(run_dir))
            raise ValueError(f"round ({config.round}): {run_dir} kept no weights of a round at "
                             f"{config.round} env steps; it kept {kept or 'none'}")  # fmt: skip
    policy = load_policy(source, config.last)
    checkpoint = policy.source
    payload = load_checkpoint(checkpoint)
    averaged = None
    if config.average > 1:  # over the rounds `mario pick --average` takes it over
        from launch.pick import round_summaries, usable_rounds

        rounds, left_out = round_summaries(run_dir)
        for path, why in left_out.items():
            logger.warning("left out of the mean: %s (%s)", path, why)
        averaged = averaged_round(usable_rounds(rounds), config.round, config.average)
        policy = _checked(dataclasses.replace(policy, weights=averaged["learner"]["online"]))
    weights = {name: tensor.detach().cpu().float().contiguous()
               for name, tensor in policy.weights.items()}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{MODEL_WEIGHTS}.tmp"  # beside it: the old model stays
    torch.save(weights, tmp)  # until the new weights are written and within the limit
    size = tmp.stat().st_size
    if size > MAX_WEIGHTS_BYTES:
        tmp.unlink()
        raise ValueError(f"the weights are {size:,} bytes, over the {MAX_WEIGHTS_BYTES:,} a "
                         "shipped model may have: train a smaller --network")  # fmt: skip
    if is_model_dir(out):  # --force: nothing of the model it replaces stays (its evaluation)
        shutil.rmtree(out)
    out.mkdir(exist_ok=True)
    tmp.replace(out / MODEL_WEIGHTS)
    model_config = {"env": dataclasses.asdict(policy.env),
                    "network": dataclasses.asdict(policy.network)}  # fmt: skip
    (out / MODEL_CONFIG).write_text(json.dumps(model_config, indent=2) + "\n")
    counters = payload["counters"]
    card = {
        "name": out.name,
        "level": policy.env.level,
        "exported": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "source": {"run_dir": str(run_dir.resolve()), "checkpoint": checkpoint.name},
        "training": {
            "env_steps": int(counters["env_steps"]),
            "updates": int(counters.get("updates", payload["learner"].get("updates", 0))),
            "wall_time_s": counters.get("elapsed_s"),
        },
        "weights": {
            "file": MODEL_WEIGHTS,
            "bytes": size,
            "dtype": "float32",
            "parameters": sum(t.numel() for t in weights.values()),
        },
        "invocations": _invocations(run_dir),
        "train_config": payload["config"],
        "selected_by": payload.get("eval"),
        "averaged_rounds": averaged["averaged_rounds"] if averaged else None,
        "eval_curve": _eval_curve(run_dir),
        "eval_milestones": _milestones(run_dir),
        "final_eval": None,
    }
    if card["selected_by"]:  # (and the online net's, played beside an average: its summary)
        card["selected_by"] = {k: v for k, v in card["selected_by"].items() if k != "per_episode"}
        if "online" in card["selected_by"]:
            online = card["selected_by"]["online"]
            card["selected_by"]["online"] = {k: v for k, v in online.items() if k != "per_episode"}
    _write_card(out, card)
    if config.eval_episodes:
        summary = evaluate(EvalConfig(checkpoint=out, episodes=config.eval_episodes,
                                      seed=config.seed, out=out / "eval"))  # fmt: skip
        card["final_eval"] = {
            "command": f"mario eval {out} --episodes {config.eval_episodes} --seed {config.seed} "
            f"--out {out / 'eval'}",
            **{k: summary[k] for k in ("episodes", "flag_rate", "max_x_pos_mean",
                                       "max_x_pos_median", "sticky_action_prob", "noop_max")},
            "per_episode": [{k: e[k] for k in ("seed", "flag_get", "max_x_pos", "length")}
                            for e in summary["per_episode"]],
        }  # fmt: skip
        _write_card(out, card)
    return card


def _invocations(run_dir: pathlib.Path) -> list[dict]:
    from launch.trainer import INVOCATIONS_FILE

    return read_jsonl(run_dir / INVOCATIONS_FILE)


def _eval_curve(run_dir: pathlib.Path) -> list[dict]:
    try:
        records = without_lost_work(load_metrics(run_dir))  # not rounds a crash lost
    except FileNotFoundError:
        return []
    curve = [{"env_steps": r["eval/env_steps"], "flag_rate": r["eval/flag_rate"],
              "x_pos_mean": r["eval/x_pos_mean"], "x_pos_median": r["eval/x_pos_median"]}
             for r in records if "eval/flag_rate" in r]  # fmt: skip
    return sorted(curve, key=lambda point: point["env_steps"])


def _milestones(run_dir: pathlib.Path) -> dict:
    try:
        return milestones(load_metrics(run_dir))
    except FileNotFoundError:
        return {}


def _write_card(out: pathlib.Path, card: dict) -> None:
    (out / MODEL_CARD).write_text(json.dumps(card, indent=2) + "\n")
    (out / "README.md").write_text(card_markdown(card))


def card_markdown(card: dict) -> str:
    """The model card in words."""
    training, final = card["training"], card["final_eval"]
    wall = training["wall_time_s"]
    lines = [
        f"# {card['name']}: double DQN on Super Mario Bros {card['level']}",
        "",
        f"Trained for {training['env_steps']:,} env steps (agent steps, 4 frames each) and "
        f"{training['updates']:,} learner updates"
        + (f" in {wall / 3600:.1f} h of wall time." if wall else "."),
        f"Weights: `{card['weights']['file']}`, {card['weights']['parameters']:,} parameters, "
        f"{card['weights']['bytes'] / 2**20:.1f} MB; env and network settings in `config.json`; "
        f"everything below in `{MODEL_CARD}`."
        + (
            f" The weights are the mean of those of the evaluation rounds at "
            f"{', '.join(f'{steps:,}' for steps in card['averaged_rounds'])} env steps (the "
            "training figures above are the centre round's)."
            if card.get("averaged_rounds")
            else ""
        ),
        "",
        "## Final evaluation",
        "",
    ]
    if final:
        flags = sum(e["flag_get"] for e in final["per_episode"])
        lines += [
            f"`{final['command']}`: the flag in {flags} of {final['episodes']} greedy episodes "
            f"(sticky actions {final['sticky_action_prob']}, 0–{final['noop_max']} no-ops); max x "
            f"mean {final['max_x_pos_mean']:.0f}, median {final['max_x_pos_median']:.0f}.",
        ]
    else:
        lines.append("Not evaluated at export.")
    lines += ["", "## How it was trained", ""]
    for invocation in card["invocations"]:
        commit = (invocation.get("commit") or "unknown")[:12]
        machine = invocation.get("machine", {})
        gpu = f", {machine['cuda']}" if machine.get("cuda") else ""
        where = f"{machine.get('cpus')} CPUs{gpu}"
        branch = (f" (a branch of `{invocation['branched_from']}`)"
                  if invocation.get("branched_from") else "")  # fmt: skip
        lines.append(f"- {invocation['time']}, from {invocation['start_env_steps']:,} env steps"
                     f"{branch}, commit {commit}{' (modified)' if invocation.get('dirty') else ''}"
                     f", {where}: `{' '.join(invocation['command'] or [])}`")  # fmt: skip
    if card["eval_curve"]:
        lines += [
            "",
            "## Evaluation during training (greedy, sticky 0.25, new seeds every round)",
            "",
            "| env steps | flag rate | max x mean | median |",
            "|---:|---:|---:|---:|",
        ]
        lines += [f"| {p['env_steps']:,} | {p['flag_rate']:.0%} | {p['x_pos_mean']:.0f} | "
                  f"{p['x_pos_median']:.0f} |" for p in card["eval_curve"]]  # fmt: skip
    if card.get("eval_milestones"):
        lines += ["", "First rounds past each flag rate:", ""]
        lines += [f"- {line}" for line in describe_milestones(card["eval_milestones"])]
    return "\n".join(lines) + "\n"


# -- play -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PlayConfig:
    """Play one greedy episode of a model (or run, or checkpoint) and write it as GIF or mp4."""

    model: tyro.conf.Positional[pathlib.Path]
    """A model folder, a run directory (its best weights) or a checkpoint file."""
    level: str | None = None
    """Level to play (default: the one the model was trained on)."""
    sticky_action_prob: float = 0.0
    """Per-frame probability that the previous action repeats."""
    noop_max: int = 0
    """Random number of no-op steps (0..noop_max) at the start."""
    seed: int = 0
    """Seed of the episode (sticky actions and no-ops)."""
    max_episode_steps: int | None = None
    """Step cap (default: the model's)."""
    out: pathlib.Path = pathlib.Path("runs/play/mario.gif")
    """Where the episode goes: .gif or .mp4."""
    frame_every: int = 1
    """Keep every k-th frame (a smaller GIF; the video plays k× faster)."""
    last: bool = False
    """With a run directory: its last checkpoint instead of its best weights."""

    def __post_init__(self) -> None:
        if self.out.suffix.lower() not in (".gif", ".mp4"):
            raise ValueError(f"out ({self.out}) must end in .gif or .mp4")
        if not 0 <= self.sticky_action_prob < 1:
            raise ValueError(f"sticky_action_prob ({self.sticky_action_prob}) must be in [0, 1)")
        if self.frame_every < 1:
            raise ValueError(f"frame_every ({self.frame_every}) must be >= 1")
        if self.seed < 0:
            raise ValueError(f"seed ({self.seed}) must be >= 0")
        if self.max_episode_steps is not None and self.max_episode_steps < 1:
            raise ValueError(f"max_episode_steps ({self.max_episode_steps}) must be >= 1")


class _EveryKth:
    """A writer that passes on every k-th frame (and always the first)."""

    def __init__(self, writer, k: int):
        self.writer, self.k, self.count = writer, k, 0

    def append_data(self, frame) -> None:
        if self.count % self.k == 0:
            self.writer.append_data(frame)
        self.count += 1


def play(config: PlayConfig) -> dict:
    """Plays the episode into config.out; returns its result (flag, max x, length, return)."""
    from launch.evaluate import Evaluator, _writer, play_on_one_thread

    play_on_one_thread()
    policy = load_policy(config.model, config.last)
    env = dataclasses.replace(
        policy.env,
        level=config.level or policy.env.level,
        sticky_action_prob=config.sticky_action_prob,
        noop_max=config.noop_max,
        max_episode_steps=config.max_episode_steps or policy.env.max_episode_steps,
    )
    config.out.parent.mkdir(parents=True, exist_ok=True)
    if config.out.suffix.lower() == ".gif":
        writer = imageio.get_writer(config.out, mode="I", duration=1000 * config.frame_every
                                    / GIF_FPS, loop=0)  # fmt: skip
    else:
        writer = _writer(config.out)
    evaluator = Evaluator(env, policy.network)
    evaluator.network.load_state_dict(policy.weights)
    try:
        result = evaluator.play(config.seed, writer=_EveryKth(writer, config.frame_every))
    finally:
        writer.close()
        evaluator.close()
    return {**result, "out": str(config.out), "model": str(policy.source)}
