"""`mario plot RUN_DIR`: the learning curve of a run, from its metrics.jsonl, as a PNG; and
`mario archive RUN_DIR`: what the plot, the evaluation table and the milestones read of a run,
kept as one small gzipped JSON-lines file (docs/runs/<name>.jsonl.gz) that `mario plot` and
`mario ablation report` read in place of the run directory, which is gigabytes and can be lost
with its machine."""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import math
import pathlib

import numpy as np
import tyro

from launch.grid_world import rolling_mean

logger = logging.getLogger("plots")
ARCHIVE_SUFFIX = ".jsonl.gz"
RUNS_ARCHIVE_DIR = pathlib.Path(__file__).resolve().parents[1] / "docs" / "runs"
# What is kept of a training episode's or a progress record (evaluations: all eval/* numbers)
ARCHIVED_KEYS = ("step", "elapsed_s", "counters/env_steps", "counters/updates", "episode/x_pos",
                 "episode/flag_get", "episode/return", "learner/loss")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class PlotConfig:
    """Render a run's learning curve (episode x_pos and return, loss, greedy eval) to PNG."""

    run_dirs: tyro.conf.Positional[tuple[pathlib.Path, ...]]
    """Run directories, or their archives (`mario archive`: <name>.jsonl.gz), to plot (several
    are drawn side by side in each panel)."""
    window: int = 50
    """Episodes in the rolling mean."""
    out: pathlib.Path | None = None
    """PNG path (default: <first run dir>/learning_curve.png; for an archive,
    runs/plots/<name>.png)."""
    table: bool = False
    """Also print each run's evaluation rounds as a Markdown table."""

    def __post_init__(self) -> None:
        if not self.run_dirs:
            raise ValueError("run_dirs: give at least one run directory to plot")
        if self.window < 1:
            raise ValueError(f"window ({self.window}) must be >= 1 episode")


def _is_archive(run_dir: pathlib.Path) -> bool:
    if not run_dir.name.endswith(ARCHIVE_SUFFIX):
        return False
    if not run_dir.is_file():
        raise FileNotFoundError(f"no archive {run_dir}")
    return True


def load_metrics(run_dir: pathlib.Path) -> list[dict]:
    """The run's metric records; a line that is not JSON (a torn last write) is skipped. An
    archive (`mario archive`) gives the records it kept. Runs before 2026-11-24 04:15 logged
    distributed episodes as episode/max_x_pos and episode/episode_return: read as today's."""
    run_dir = pathlib.Path(run_dir)
    if _is_archive(run_dir):
        return [r for r in read_archive(run_dir) if "invocation" not in r]
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    records = read_jsonl(path)
    for record in records:
        if "episode/max_x_pos" in record:
            record["episode/x_pos"] = record.pop("episode/max_x_pos")
            record["episode/return"] = record.pop("episode/episode_return", None)
    return records


def invocations(run_dir: pathlib.Path) -> list[dict]:
    """The run's invocations.jsonl records (command, commit, start env steps, branch); from an
    archive, the ones it kept."""
    run_dir = pathlib.Path(run_dir)
    if _is_archive(run_dir):
        return [r["invocation"] for r in read_archive(run_dir) if "invocation" in r]
    return read_jsonl(run_dir / "invocations.jsonl")


def run_name(run_dir: pathlib.Path) -> str:
    """A run's name: its directory's, or its archive's without the suffix."""
    return pathlib.Path(run_dir).name.removesuffix(ARCHIVE_SUFFIX)


def archived(record: dict) -> dict | None:
    """What an archive keeps of a metric record: an evaluation whole (without its video's
    path), a training episode's or a progress record's ARCHIVED_KEYS; None for any other."""
    if "eval/flag_rate" in record:
        return {
            k: v
            for k, v in record.items()
            if k == "step" or (k.startswith(("eval/", "eval_online/")) and not isinstance(v, str))
        }
    if "episode/x_pos" in record or "counters/env_steps" in record:
        return {k: record[k] for k in ARCHIVED_KEYS if k in record}
    return None


def env_steps_reached(records: list[dict]) -> int:
    """The most env steps the records' progress counters reached."""
    return max((r["counters/env_steps"] for r in records if "counters/env_steps" in r), default=0)


def archive_run(run_dir: pathlib.Path, path: pathlib.Path) -> bool:
    """Writes the archive of `run_dir` to `path`, with the run's invocations ({"invocation": …}
    records); returns whether it did: an archive that reached more env steps than the run
    directory (a run begun again) is left as it is."""
    kept = [r for r in map(archived, load_metrics(run_dir)) if r is not None]
    kept += [{"invocation": r} for r in invocations(run_dir)]
    archived_steps = env_steps_reached(read_archive(path)) if path.is_file() else 0
    if archived_steps > env_steps_reached(kept):
        logger.warning("%s: its archive %s reached %d env steps, the run %d: archive kept",
                       run_dir, path, archived_steps, env_steps_reached(kept))  # fmt: skip
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    # mtime 0 and no file name: the same records give the same bytes (no churn in the repo)
    with (
        open(tmp, "wb") as raw,
        gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as file,
    ):
        file.write("".join(json.dumps(r) + "\n" for r in kept).encode())
    tmp.replace(path)
    return True


def read_archive(path: pathlib.Path) -> list[dict]:
    """The records `archive_run` kept.

    Raises:
        ValueError: the file is no archive (not gzip, or not JSON lines), naming it.
    """
    try:
        with gzip.open(path, "rt") as file:
            return [json.loads(line) for line in file if line.strip()]
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is no readable archive: {error}") from None


@dataclasses.dataclass(frozen=True)
class ArchiveConfig:
    """Keep what `mario plot` and the evaluation table read of runs, one small file per run."""

    run_dirs: tyro.conf.Positional[tuple[pathlib.Path, ...]]
    """Run directories to archive."""
    out: pathlib.Path = RUNS_ARCHIVE_DIR
    """Directory of the archives: <run name>.jsonl.gz (default: the checkout's docs/runs)."""

    def __post_init__(self) -> None:
        if not self.run_dirs:
            raise ValueError("run_dirs: give at least one run directory to archive")
        names: dict[str, pathlib.Path] = {}
        for run_dir in self.run_dirs:
            if not (pathlib.Path(run_dir).expanduser() / "metrics.jsonl").is_file():
                raise ValueError(f"run_dirs: {run_dir} holds no metrics.jsonl (not a run?)")
            name = _archive_name(run_dir)
            if name in names:
                raise ValueError(f"run_dirs: {names[name]} and {run_dir} are both named {name!r}: "
                                 "their archives would be one file")  # fmt: skip
            names[name] = run_dir


def _archive_name(run_dir: pathlib.Path) -> str:
    return pathlib.Path(run_dir).expanduser().resolve().name + ARCHIVE_SUFFIX


def archive(config: ArchiveConfig) -> list[tuple[pathlib.Path, bool]]:
    """(archive path, written) per run directory."""
    results = []
    for run_dir in config.run_dirs:
        path = config.out / _archive_name(run_dir)
        results.append((path, archive_run(pathlib.Path(run_dir).expanduser(), path)))
    return results


def read_jsonl(path: pathlib.Path) -> list[dict]:
    """The records of a run's JSON-lines file ([] if absent); a torn line is skipped."""
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def eval_curve(records: list[dict]) -> list[tuple[int, float, float]]:
    """(env steps, flag rate, mean max x) of each evaluation round, in env-step order."""
    rounds = [r for r in records if "eval/flag_rate" in r]
    return sorted((r["eval/env_steps"], r["eval/flag_rate"], r["eval/x_pos_mean"]) for r in rounds)


def paired_episodes(run_dir: pathlib.Path) -> dict | None:
    """The rounds that played an average of the weights and the online net on the same seeds
    (--eval.compare-online), episode by episode from the run's kept round files: how many
    episodes only the average flagged, only the online net, both, neither, and the exact
    two-sided sign test (McNemar's) on the episodes where they differ. None: no such round kept
    (or an archive, which keeps no round files)."""
    from learner.checkpoint import CheckpointError, kept_rounds, load_checkpoint

    counts = {"rounds": 0, "only_average": 0, "only_online": 0, "both": 0, "neither": 0}
    for path in kept_rounds(pathlib.Path(run_dir)).values():
        try:
            evaluation = load_checkpoint(path)["eval"]
        except (CheckpointError, KeyError):
            continue
        if "online" not in evaluation:
            continue
        counts["rounds"] += 1
        online = {e["seed"]: e["flag_get"] for e in evaluation["online"]["per_episode"]}
        for episode in evaluation["per_episode"]:
            if episode["seed"] not in online:  # (both play the same seeds: not seen)
                continue
            average, other = bool(episode["flag_get"]), bool(online[episode["seed"]])
            key = ("both" if other else "only_average") if average else (
                "only_online" if other else "neither")  # fmt: skip
            counts[key] += 1
    if not counts["rounds"]:
        return None
    differ = counts["only_average"] + counts["only_online"]
    fewer = min(counts["only_average"], counts["only_online"])
    tail = sum(math.comb(differ, k) for k in range(fewer + 1)) / 2**differ if differ else 0.5
    return {**counts, "sign_test_p": min(1.0, 2 * tail)}


def training_time(records: list[dict]) -> list[tuple[int, float]]:
    """(env steps, seconds of training then) of each counters record, in env-step order."""
    return sorted((r["step"], r["elapsed_s"]) for r in records
                  if "counters/env_steps" in r and "elapsed_s" in r)  # fmt: skip


def eval_table(records: list[dict]) -> list[str]:
    """The evaluation rounds as a Markdown table: env steps, the policy version (learner updates)
    evaluated, flag rate, max x mean / median / max, and the training wall time at that step."""
    records = without_lost_work(records)
    progress = training_time(records)
    rounds = sorted((r for r in records if "eval/flag_rate" in r),
                    key=lambda r: r["eval/env_steps"])  # fmt: skip
    lines = ["| env steps | updates | eval flag rate | eval max x: mean / median / max | minutes |",
             "|---:|---:|---:|---|---:|"]  # fmt: skip
    for r in rounds:
        steps = r["eval/env_steps"]
        later = [seconds for at, seconds in progress if at >= steps]
        minutes = f"{later[0] / 60:.0f}" if later else "?"
        version = r.get("eval/policy_version")
        x_max = r.get("eval/x_pos_max")
        online = r.get("eval_online/flag_rate")  # the online net's, when the round played an EMA
        flags = f"{r['eval/flag_rate']:.2f}" + ("" if online is None else f" (online {online:.2f})")
        lines.append(
            f"| {steps:,} | {'?' if version is None else f'{version:,}'} | "
            f"{flags} | {r['eval/x_pos_mean']:,.0f} / "
            f"{r.get('eval/x_pos_median', float('nan')):,.0f} / "
            f"{'?' if x_max is None else f'{x_max:,}'} | {minutes} |"
        )
    paired = [r for r in rounds if "eval_online/flag_rate" in r]
    if paired:  # the rounds that played an average and the online net on the same seeds
        average = np.mean([r["eval/flag_rate"] for r in paired])
        online = np.mean([r["eval_online/flag_rate"] for r in paired])
        lines.append(f"| rounds of both: {len(paired)} | | mean {average:.2f} (online "
                     f"{online:.2f}) | | |")  # fmt: skip
    return lines


def branch_points(run_dir: pathlib.Path) -> list[tuple[int, str]]:
    """(env steps, parent run's name) where the run's history became a branch (`mario train
    --branch-from`), from its invocations.jsonl; [] for a run that never branched."""
    return [(int(r["start_env_steps"]), pathlib.Path(r["branched_from"]).name)
            for r in invocations(run_dir) if r.get("branched_from")]  # fmt: skip


def without_lost_work(records: list[dict]) -> list[dict]:
    """The records without those a crash lost: a run resumed from a checkpoint logs its steps
    again from there, after the lost session's records of the same steps; those are dropped.
    Records of one session that share a step with the counters after them (an evaluation round,
    an episode) are kept."""
    kept: list[dict] = []
    for record in records:
        step = record.get("step")
        if step is not None and "counters/env_steps" in record:
            while kept and (
                kept[-1].get("step", -1) > step
                or (kept[-1].get("step") == step and "counters/env_steps" in kept[-1])
            ):
                kept.pop()
        kept.append(record)
    return kept


MILESTONES = (("flag_rate > 0", 0.0, False), ("flag_rate > 0.5", 0.5, False),
              ("flag_rate >= 0.9", 0.9, True))  # fmt: skip


def milestones(records: list[dict]) -> dict[str, dict | None]:
    """When the greedy evaluation first reached each flag rate of MILESTONES: the env step of the
    evaluated weights and the run's training wall time then (elapsed_s, carried across resumes,
    interpolated between the counter records around that step); None if never."""
    records = without_lost_work(records)
    progress = training_time(records)
    reached: dict[str, dict | None] = {}
    for name, threshold, inclusive in MILESTONES:
        first = next((steps for steps, rate, _ in eval_curve(records)
                      if rate > threshold or (inclusive and rate >= threshold)), None)  # fmt: skip
        if first is None:
            reached[name] = None
            continue
        elapsed = None
        if progress:
            steps, seconds = zip(*progress, strict=True)
            elapsed = float(np.interp(first, steps, seconds))
        reached[name] = {"env_steps": first, "elapsed_s": elapsed}
    return reached


def describe_milestones(reached: dict[str, dict | None]) -> list[str]:
    """One line per milestone, e.g. "flag_rate > 0: 350,000 env steps, 1 h 02 min of training"."""
    lines = []
    for name, when in reached.items():
        if when is None:
            lines.append(f"{name}: not reached")
            continue
        wall = ""
        if when["elapsed_s"] is not None:
            minutes = round(when["elapsed_s"] / 60)
            wall = f", {minutes // 60} h {minutes % 60:02d} min of training"
        lines.append(f"{name}: {when['env_steps']:,} env steps{wall}")
    return lines


def plot(config: PlotConfig) -> pathlib.Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, grid = plt.subplots(2, 2, figsize=(13, 8))
    axes = grid.flatten()
    eval_x = axes[3].twinx()
    for run_dir in config.run_dirs:
        records = load_metrics(run_dir)
        episodes = [r for r in records if "episode/x_pos" in r]
        steps = np.array([r["step"] for r in episodes])
        x_pos = np.array([r["episode/x_pos"] for r in episodes], dtype=float)
        # (archives of the ablation's rows made before 2026-11-27 kept no return)
        returns = np.array([r.get("episode/return", np.nan) for r in episodes], dtype=float)
        label = run_name(run_dir)
        if len(episodes):
            axes[0].scatter(steps, x_pos, s=2, alpha=0.2)
            axes[0].plot(steps, rolling_mean(x_pos, config.window), label=label)
            if not np.isnan(returns).all():
                axes[1].plot(steps, rolling_mean(returns, config.window), label=label)
        updates = [r for r in records if "learner/loss" in r]
        if updates:
            axes[2].plot(
                [r["step"] for r in updates], [r["learner/loss"] for r in updates], label=label
            )
        for i, (at, parent) in enumerate(branch_points(run_dir)):  # settings changed here
            for axis in axes:
                axis.axvline(at, color="grey", linestyle="-.", linewidth=1)
            axes[3].annotate(f"branch of {parent} ", (at, 0.95 - 0.06 * i), fontsize=7,
                             ha="right", va="top")  # fmt: skip
        evals = eval_curve(records)
        if evals:
            steps, flags, x_means = zip(*evals, strict=True)
            line = axes[3].plot(steps, flags, marker="o", label=f"{label}: flag rate")[0]
            eval_x.plot(steps, x_means, linestyle="--", color=line.get_color(),
                        label=f"{label}: mean max x")  # fmt: skip
            online = sorted((r["eval/env_steps"], r["eval_online/flag_rate"]) for r in records
                            if "eval_online/flag_rate" in r)  # fmt: skip
            if online:  # --eval.compare-online: the rounds above played the weights' average
                axes[3].plot(*zip(*online, strict=True), marker="x", linestyle=":",
                             color=line.get_color(),
                             label=f"{label}: online net's flag rate")  # fmt: skip
    axes[0].set(
        title=f"max x_pos per episode (rolling mean of {config.window})",
        xlabel="env steps",
        ylabel="x_pos",
    )
    axes[0].axhline(3161, color="grey", linestyle=":", linewidth=1)  # 1-1's flag pole
    axes[1].set(title="episode return (rolling mean)", xlabel="env steps", ylabel="return")
    axes[2].set(title="learner loss", xlabel="env steps", ylabel="Huber loss")
    axes[3].set(title="greedy evaluation during training (sticky 0.25)", xlabel="env steps",
                ylabel="flag rate (solid)", ylim=(-0.05, 1.05))  # fmt: skip
    eval_x.set(ylabel="mean max x_pos (dashed)", ylim=(0, 3300))
    for axis in axes:
        if axis.get_legend_handles_labels()[0]:  # a panel with nothing to draw has no legend
            axis.legend(loc="upper left", fontsize=8)
    if eval_x.lines:
        eval_x.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    first = pathlib.Path(config.run_dirs[0])
    default = (
        pathlib.Path("runs/plots") / f"{run_name(first)}.png"  # git-ignored, not beside it
        if first.is_file()
        else first / "learning_curve.png"
    )
    out = config.out or default
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=90)
    plt.close(figure)
    return out
