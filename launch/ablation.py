"""`mario ablation run|report|archive|floor`: the recipe search on 1-1, one lever per row, at
one env-step budget.

Every row is a recipe (BASE, or REFERENCE: `mario train`'s defaults until commit d99c29f) plus
the flags of its lever, trained by `mario train` into ROOT/<row> (continued with
--resume-existing when the directory holds a run, so rows can span sessions). The report reads
each row's metrics.jsonl (or its archive, whichever reached more env steps): the in-training
evaluation that ended the row at the budget, the best one before it, the training episodes, the
wall time; it writes a markdown table and one PNG of the evaluation curves. `archive` keeps
what the report reads of each row in the repository (ARCHIVE_DIR, a few hundred KB), so a row
outlives the machine that trained it. `floor` plays each action of a row's set held at every
step on the row's evaluation (its env, the seeds of its rounds up to the budget): the score a
learned policy has to beat (on 1-1 with --env.release-jump, holding right+A reaches the flag in
about one episode in five); the report prints the best held action beside each row.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import re
import shlex
import signal
import subprocess
import sys

import numpy as np
import tyro

from launch.plots import archive_run, env_steps_reached, load_metrics, read_archive

logger = logging.getLogger("ablation")

# The rows compare one lever each against one of two recipes at the same budget:
#
# - "base": run r1's recipe (docs/training-runs.md: DI-adventure's two actions, a stuck episode
#   ended as a death as in R2D4, +50 at the flag, rewards ÷ 10, γ 0.99, ε decaying from 1
#   toward a 0.1…0.01 ladder, dueling, Adam 1e-4, target sync 500, samples-per-insert 4) with
#   the narrower network, which learned as well at 300k env steps with a learner 1.8× as fast
#   (row nature-net is r1 itself). Its greedy policy stood at the first pipe holding right+A.
# - "reference": `mario train`'s defaults until commit d99c29f (2026-11-26, session 10): the
#   base plus --env.release-jump (a jump action always jumps) and a learning rate that steps down to
#   2.5e-5 at update 180,000 (after the 37,500 updates of a 300k budget). Rows run before that
#   step was added trained the same recipe up to the budget, but a row begun before it is
#   refused on resume by a newer checkout, whose flags contradict its run: finish it from a
#   worktree of the older commit. The rows measured after release-jump are on it. Until
#   session 10 it was called "defaults"; `mario train`'s defaults are now the reference plus
#   the levers of rows downsample and ema (a test checks it; sessions 10–12: explore-repeat).
BASE = (
    "--env.action-set", "right_jump", "--env.stuck-steps", "100", "--env.stuck-is-death",
    "--env.flag-bonus", "50", "--env.reward-scale", "0.1", "--env.no-release-jump",
    "--env.graphics", "vanilla",
    "--actor.gamma", "0.99", "--actor.epsilon-decay-steps", "100000",
    "--actor.epsilon-base", "0.1", "--actor.epsilon-alpha", "1", "--actor.explore-repeat-max", "1",
    "--network.dueling", "--network.conv-channels", "16", "32", "32", "--network.hidden", "256",
    "--learner.learning-rate", "1e-4", "--learner.target-sync-updates", "500",
    "--learner.ema-decay", "0", "--replay.samples-per-insert", "4",
)  # fmt: skip

# The reference spelled out, so that a row's run keeps its meaning when `mario train`'s
# defaults change, and resuming a row made on another recipe is an error.
REFERENCE = (
    *("--env.release-jump" if flag == "--env.no-release-jump" else flag for flag in BASE),
    "--learner.learning-rate-final", "2.5e-5", "--learner.learning-rate-decay-start", "180000",
)  # fmt: skip

# The parts' own defaults (the tutorial's and Ape-X's), which were `mario train`'s before the
# recipe: right_only, γ 0.9, Ape-X's ε ladder, no stuck rule, no flag bonus, Nature's net.
TUTORIAL = (
    "--env.action-set", "right_only", "--env.stuck-steps", "0", "--env.no-stuck-is-death",
    "--env.flag-bonus", "0", "--env.reward-scale", "1", "--env.no-release-jump",
    "--env.graphics", "vanilla",
    "--actor.gamma", "0.9", "--actor.epsilon-decay-steps", "0", "--actor.epsilon-base", "0.4",
    "--actor.epsilon-alpha", "7", "--actor.explore-repeat-max", "1", "--network.no-dueling",
    "--network.conv-channels", "32", "64", "64", "--network.hidden", "512",
    "--learner.learning-rate", "2.5e-4",
    "--learner.learning-rate-final", "None", "--learner.learning-rate-decay-start", "0",
    "--learner.target-sync-updates", "2000", "--learner.ema-decay", "0",
    "--replay.samples-per-insert", "8",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Row:
    lever: str
    """What the row changes, in words."""
    flags: tuple[str, ...] = ()
    """Flags after its recipe's (later flags win)."""
    against: str = "reference"
    """The recipe the flags change: "base" (BASE), "reference" (REFERENCE: `mario train`'s
    defaults until commit d99c29f) or "none" (the flags alone)."""


ROWS: dict[str, Row] = {
    "base": Row("run r1's recipe with the narrow net", against="base"),
    "reference": Row("`mario train`'s defaults until commit d99c29f: the base plus "
                     "--env.release-jump (and a learning rate step at update 180,000, after the "
                     "budget)"),
    "tutorial": Row("the parts' own defaults (`mario train`'s before the recipe)", TUTORIAL,
                    against="none"),
    "nature-net": Row("network width: Nature's conv 32-64-64, hidden 512 (base: 16-32-32, 256)",
                      ("--network.conv-channels", "32", "64", "64", "--network.hidden", "512"),
                      against="base"),
    "right-only": Row("action set: right_only (5 actions)", ("--env.action-set", "right_only"),
                      against="base"),
    "downsample": Row("graphics: gym-super-mario-bros 7.x's downsample ROM (its "
                      "SuperMarioBros-v1: black sky, scenery blanked)",
                      ("--env.graphics", "downsample")),
    "stuck-truncate": Row("stuck episode: bootstrapped truncation, not a death",
                          ("--env.no-stuck-is-death",)),
    "stuck-off": Row("stuck episode: off", ("--env.no-stuck-is-death", "--env.stuck-steps", "0")),
    "stuck-40": Row("stuck episode after 40 steps without progress (reference: 100)",
                    ("--env.stuck-steps", "40")),
    "sticky-train": Row("sticky actions 0.25 while training (as evaluated)",
                        ("--env.sticky-action-prob", "0.25")),
    "apex-epsilon": Row("ε: Ape-X ladder 0.4^(1+7i/7) from the start, no decay",
                        ("--actor.epsilon-decay-steps", "0", "--actor.epsilon-base", "0.4",
                         "--actor.epsilon-alpha", "7")),
    "explore-repeat": Row("temporally-extended ε-greedy: a random action held 1–8 steps",
                          ("--actor.explore-repeat-max", "8")),
    "gamma-0.9": Row("γ 0.9 (the tutorial's)", ("--actor.gamma", "0.9")),
    "n-step-5": Row("n-step 5", ("--actor.n-step", "5")),
    "no-flag-scale": Row("no flag bonus, reward scale 1",
                         ("--env.flag-bonus", "0", "--env.reward-scale", "1")),
    "spi-8": Row("samples per insert 8", ("--replay.samples-per-insert", "8")),
    "no-dueling": Row("plain Nature head (no dueling)", ("--network.no-dueling",)),
    "lr-2.5e-4": Row("learning rate 2.5e-4 (the tutorial's)",
                     ("--learner.learning-rate", "2.5e-4")),
    "lr-fall-300k": Row("learning rate 1e-4 falling linearly to 2.5e-5 over the budget's "
                        "37,500 updates (reference: at update 180,000, after the budget)",
                        ("--learner.learning-rate-decay-start", "0",
                         "--learner.learning-rate-decay-updates", "37500")),
    "target-2000": Row("target sync every 2,000 updates",
                       ("--learner.target-sync-updates", "2000")),
    "dqn": Row("DQN: no double-Q (the tutorial's comparison)", ("--learner.no-double",)),
    "advantage-learning": Row("Advantage Learning, α 0.9 (widens the action gap)",
                              ("--learner.advantage-learning", "0.9")),
    "ema": Row("evaluation plays an average of the weights, decay 0.9998 (training unchanged)",
               ("--learner.ema-decay", "0.9998")),
}  # fmt: skip

RECIPES = {"base": BASE, "reference": REFERENCE, "none": ()}
# `mario train`'s defaults: the reference plus these rows' levers (a test checks it); from session
# 10 to 12 it was "explore-repeat", from 12 to 23 "downsample" alone
DEFAULTS_ROWS = ("downsample", "ema")
DEFAULT_ROOT = pathlib.Path("~/mario-runs/ablation")
DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"  # the checkout's, wherever run from
ARCHIVE_DIR = DOCS / "ablation-rows"


FLOOR_FILE = ARCHIVE_DIR / "floor.json"
# Env fields that change only rewards, how an episode's end is labelled, or what the agent sees
# (the downsample ROM patches tile graphics and a palette, which the game logic does not read;
# the stack shapes observations): a held action's episodes (x, flag) are the same whatever they
# are, so rows that differ only there share a floor.
FLOOR_IGNORED_FIELDS = ("flag_bonus", "reward_scale", "stuck_is_death", "reward", "graphics",
                        "frame_stack")  # fmt: skip


def _check_rows(rows: tuple[str, ...]) -> None:
    unknown = [row for row in rows if row not in ROWS]
    if unknown:
        raise ValueError(f"rows {unknown} are unknown; known: {', '.join(ROWS)}")


@dataclasses.dataclass(frozen=True)
class AblationRunConfig:
    """Train the named rows one after the other (each continued if its directory holds a run)."""

    rows: tyro.conf.Positional[tuple[str, ...]]
    """Rows to train, by name (`mario ablation report` lists them)."""
    root: pathlib.Path = DEFAULT_ROOT
    """Directory holding one run directory per row."""
    env_steps: int = 300_000
    """The budget of every row."""
    checkpoint_minutes: float = 10.0
    """Checkpoint period of each row's run."""
    dry_run: bool = False
    """Print the commands instead of running them."""

    def __post_init__(self) -> None:
        if not self.rows:
            raise ValueError(f"rows: name at least one row to train; known: {', '.join(ROWS)}")
        _check_rows(self.rows)
        if self.env_steps < 1:
            raise ValueError(f"env_steps ({self.env_steps}) must be >= 1")
        if self.checkpoint_minutes <= 0:
            raise ValueError(f"checkpoint_minutes ({self.checkpoint_minutes}) must be > 0")


def command(row: str, root: pathlib.Path, env_steps: int, checkpoint_minutes: float) -> list[str]:
    """The `mario train` arguments of one row."""
    return [
        "train", "--run-dir", str(root.expanduser() / row), "--resume-existing",
        "--total-env-steps", str(env_steps), "--checkpoint-minutes", f"{checkpoint_minutes:g}",
        "--no-live-display", "--wandb", "offline", *RECIPES[ROWS[row].against], *ROWS[row].flags,
    ]  # fmt: skip


def run(config: AblationRunConfig) -> list[list[str]]:
    """Trains each row in turn; returns the commands."""
    commands = [
        command(row, config.root, config.env_steps, config.checkpoint_minutes)
        for row in config.rows
    ]
    for row, args in zip(config.rows, commands, strict=True):
        print("mario " + shlex.join(args), flush=True)
        if config.dry_run:
            continue
        if row_done(config.root.expanduser() / row, config.env_steps):
            print(f"row {row}: done (evaluated at its budget); skipped", flush=True)
            continue
        if not _train(row, args):
            break
    return commands


def row_done(run_dir: pathlib.Path, env_steps: int) -> bool:
    """Whether the row's run reached the budget and was evaluated there (its status.json)."""
    try:
        status = json.loads((run_dir / "status.json").read_text())
        return status["last_eval"]["env_steps"] >= env_steps
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _train(row: str, args: list[str]) -> bool:
    """Runs one row's `mario train`; SIGINT/SIGTERM go to it (it checkpoints and ends), and no
    later row starts. Returns whether to go on."""
    process = subprocess.Popen([sys.executable, "-m", "launch.cli", *args])
    stopped = []

    def forward(signum, frame) -> None:
        stopped.append(signum)
        process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code != 0 and not stopped:  # its own error is printed above; later rows do not start
        raise ChildProcessError(f"row {row}: mario train exited with {code} (its error is above)")
    return not stopped


@dataclasses.dataclass(frozen=True)
class AblationReportConfig:
    """The rows' results at the budget as a markdown table and a PNG of the evaluation curves."""

    root: pathlib.Path = DEFAULT_ROOT
    """Directory holding one run directory per row."""
    env_steps: int = 300_000
    """The budget the rows are compared at."""
    rows: tuple[str, ...] = tuple(ROWS)
    """Rows to report (those with neither a run directory nor an archive are listed as not run)."""
    archive: pathlib.Path | None = ARCHIVE_DIR
    """Where `mario ablation archive` kept the rows: read for a row whose directory is gone."""
    out: pathlib.Path = DOCS / "ablation-rows.png"
    """PNG of the evaluation curves."""
    table_out: pathlib.Path | None = None
    """Also write the markdown table there."""
    pair_out: pathlib.Path = pathlib.Path("docs/dqn-vs-ddqn.png")
    """PNG of the tutorial's comparison (rows `dqn` and `reference`), when both are reported."""
    floor: pathlib.Path | None = FLOOR_FILE
    """The held-action floors `mario ablation floor` measured: a row's is printed beside it."""

    def __post_init__(self) -> None:
        _check_rows(self.rows)
        if self.env_steps < 1:
            raise ValueError(f"env_steps ({self.env_steps}) must be >= 1")


def training_episodes(records: list[dict], env_steps: int) -> list[dict]:
    """The training episodes that ended up to the budget, in the order they ended."""
    return [r for r in records if "episode/x_pos" in r and r["step"] <= env_steps]


def row_result(records: list[dict], env_steps: int) -> dict:
    """One row's numbers at the budget, from its metric records.

    "final" is the evaluation that started when the budget was reached (the first with
    eval/env_steps ≥ budget); "best" the best (flag rate, then mean max x) up to it; the
    training numbers count the episodes that ended before the budget.
    """
    evals = sorted((r for r in records if "eval/flag_rate" in r), key=lambda r: r["eval/env_steps"])
    final = next((r for r in evals if r["eval/env_steps"] >= env_steps), None)
    last_step = final["eval/env_steps"] if final else env_steps
    within = [r for r in evals if r["eval/env_steps"] <= last_step]
    best = max(within, key=lambda r: (r["eval/flag_rate"], r["eval/x_pos_mean"]), default=None)
    episodes = training_episodes(records, env_steps)
    progress = [r for r in records if "counters/env_steps" in r]
    reached = env_steps_reached(progress)
    at_budget = [r for r in progress if r["counters/env_steps"] <= env_steps]
    last = at_budget[-1] if at_budget else {}
    last_100 = [r["episode/x_pos"] for r in episodes[-100:]]
    # one round of 10 episodes is noisy: the mean of every round up to the budget is less so
    rounds_mean = None
    if within:
        rounds_mean = (float(np.mean([r["eval/flag_rate"] for r in within])),
                       float(np.mean([r["eval/x_pos_mean"] for r in within])))  # fmt: skip
    return {
        "env_steps_reached": reached,
        "done": final is not None,
        "final": final,
        "best": best,
        "rounds_mean": rounds_mean,
        "evals": [(r["eval/env_steps"], r["eval/flag_rate"], r["eval/x_pos_mean"]) for r in evals],
        "evals_within": within,
        "train_episodes": len(episodes),
        "train_flags": sum(int(r["episode/flag_get"]) for r in episodes),
        "train_x_mean_last_100": float(np.mean(last_100)) if last_100 else None,
        "updates": last.get("counters/updates"),
        "minutes": last["elapsed_s"] / 60 if "elapsed_s" in last else None,
    }


def _cell(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def floor_cell(floor: tuple[str, int, int, float] | None) -> str:
    """A row's floor (floor_of) as the table prints it; "–" when not measured."""
    if floor is None:
        return "–"
    name, flags, episodes, x_mean = floor
    return f"{flags / episodes:.0%} / {x_mean:.0f} ({name})"


def table(
    results: dict[str, dict | None],
    env_steps: int,
    floors: dict[str, tuple[str, int, int, float] | None] | None = None,
) -> str:
    """The markdown table of the rows; `floors`: each row's floor_of (absent: "–")."""
    floors = floors or {}
    lines = [
        f"| row | lever | against | eval flags at {env_steps:,} | eval max x mean / median | "
        "best eval up to it (env steps) | all rounds to it: flags / max x | held-action floor "
        "on those rounds | training flags | training max x, last 100 | updates | minutes |",
        "|---|---|---|---:|---|---|---|---|---:|---:|---:|---:|",
    ]
    for row, result in results.items():
        against = (
            ""
            if row in ("base", "reference") or ROWS[row].against == "none"
            else (ROWS[row].against)
        )
        lever = f"{ROWS[row].lever} | {against}"
        floor = floor_cell(floors.get(row))
        if result is None:
            lines.append(f"| {row} | {lever} | not run | | | | {floor} | | | | |")
            continue
        final, best = result["final"], result["best"]
        if final is None:
            lines.append(f"| {row} | {lever} | not finished: at {result['env_steps_reached']:,} "
                         f"env steps | | | | {floor} | | | | |")  # fmt: skip
            continue
        best_cell = (f"{best['eval/flag_rate']:.0%}, x {best['eval/x_pos_mean']:.0f} "
                     f"({best['eval/env_steps']:,})")  # fmt: skip
        flags_mean, x_mean = result["rounds_mean"]
        lines.append(
            f"| {row} | {lever} | {final['eval/flag_rate']:.0%} | "
            f"{final['eval/x_pos_mean']:.0f} / {final['eval/x_pos_median']:.0f} | {best_cell} | "
            f"{flags_mean:.0%} / {x_mean:.0f} ({len(result['evals_within'])} rounds) | {floor} | "
            f"{result['train_flags']} of {result['train_episodes']} | "
            f"{_cell(result['train_x_mean_last_100'], '.0f')} | {_cell(result['updates'], ',')} | "
            f"{_cell(result['minutes'], '.0f')} |"
        )
    return "\n".join(lines)


def training_bins(records: list[dict], env_steps: int, bins: int = 6) -> list[tuple]:
    """The training episodes that ended up to the budget, in `bins` equal spans of env steps:
    (flags, episodes, mean max x or None) per span (an episode ending at a span's last step is
    in it)."""
    width = env_steps / bins
    spans: list[list[dict]] = [[] for _ in range(bins)]
    for r in training_episodes(records, env_steps):
        if r["step"] > 0:
            spans[min(int((r["step"] - 1) // width), bins - 1)].append(r)
    return [
        (sum(int(r["episode/flag_get"]) for r in span), len(span),
         float(np.mean([r["episode/x_pos"] for r in span])) if span else None)
        for span in spans
    ]  # fmt: skip


def training_table(records: dict[str, list[dict]], env_steps: int, bins: int = 6) -> str:
    """Per row, its training episodes in `bins` spans of the budget: flags / episodes and mean
    max x. The evaluation rounds are 10 greedy episodes each; these are hundreds, with
    exploration: where the rows' learning differs before their greedy policies show it."""
    width = env_steps // bins
    heads = [f"{i * width // 1000:,}k–{(i + 1) * width // 1000:,}k" for i in range(bins)]
    lines = ["| row | " + " | ".join(heads) + " |", "|---|" + "---:|" * bins]
    for row, row_records in records.items():
        cells = [f"{flags} / {count}, x {_cell(x, '.0f')}"
                 for flags, count, x in training_bins(row_records, env_steps, bins)]  # fmt: skip
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


PAIR = ("dqn", "reference")  # the tutorial's comparison: DQN against double DQN
X_LEVELS = (1000, 1500, 2000)


def episodes_to(records: list[dict], env_steps: int, window: int = 100) -> dict[str, int | None]:
    """How many training episodes (in the order they ended, up to the budget) a row needed: to
    its first flag, and until the mean max x of its last `window` episodes first reached each of
    X_LEVELS. None: not within the budget."""
    episodes = training_episodes(records, env_steps)
    out = {"first flag": next((i + 1 for i, r in enumerate(episodes) if r["episode/flag_get"]),
                              None)}  # fmt: skip
    x = np.array([r["episode/x_pos"] for r in episodes], dtype=float)
    means = np.convolve(x, np.ones(window) / window, mode="valid") if len(x) >= window else []
    for level in X_LEVELS:
        reached = np.flatnonzero(np.asarray(means) >= level)
        out[f"mean max x ≥ {level:,}"] = int(reached[0]) + window if len(reached) else None
    return out


def pair_table(records: dict[str, list[dict]], env_steps: int) -> str:
    """DQN against double DQN: episodes to each milestone, their ratio, the evaluation."""
    dqn, ddqn = (episodes_to(records[row], env_steps) for row in PAIR)
    lines = [f"| training episodes to (budget {env_steps:,} env steps) | DQN | double DQN | "
             "DQN ÷ double DQN |", "|---|---:|---:|---:|"]  # fmt: skip
    for name in dqn:
        a, b = dqn[name], ddqn[name]
        ratio = f"{a / b:.2f}" if a and b else "–"
        lines.append(f"| {name} | {_cell(a, ',')} | {_cell(b, ',')} | {ratio} |")
    return "\n".join(lines)


def plot_pair(records: dict[str, list[dict]], env_steps: int, out: pathlib.Path) -> pathlib.Path:
    """One figure: training max x (mean of the last 100) against episodes, and the greedy
    evaluation's flag rate and mean max x against env steps, for DQN and double DQN."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    for row, label in zip(PAIR, ("DQN", "double DQN"), strict=True):
        x = [r["episode/x_pos"] for r in training_episodes(records[row], env_steps)]
        if len(x) >= 100:
            axes[0].plot(np.arange(100, len(x) + 1),
                         np.convolve(x, np.ones(100) / 100, mode="valid"), label=label)  # fmt: skip
        evals = row_result(records[row], env_steps)["evals"]
        _plot_evals_on(axes[1], axes[2], evals, env_steps, label)
    axes[0].set(title="training max x, mean of the last 100 episodes", xlabel="training episodes",
                ylabel="x_pos")  # fmt: skip
    return _save(figure, axes, axes[1], axes[2], out)


def _plot_evals_on(flag_axis, x_axis, evals: list[tuple], env_steps: int, label: str) -> None:
    evals = [e for e in evals if e[0] <= env_steps * 1.05]
    if evals:
        steps, flags, x_mean = zip(*evals, strict=True)
        flag_axis.plot(steps, flags, marker="o", label=label)
        x_axis.plot(steps, x_mean, marker="o", label=label)


def _save(figure, axes, flag_axis, x_axis, out: pathlib.Path) -> pathlib.Path:
    """Titles the evaluation panels, adds the legends, writes the PNG."""
    import matplotlib.pyplot as plt

    flag_axis.set(title="greedy eval flag rate (sticky 0.25)", xlabel="env steps",
                  ylabel="flag rate", ylim=(-0.05, 1.05))  # fmt: skip
    x_axis.set(title="greedy eval max x, mean", xlabel="env steps", ylabel="x_pos")
    x_axis.axhline(3161, color="grey", linestyle=":", linewidth=1)  # 1-1's flag pole
    for axis in axes:
        if axis.get_legend_handles_labels()[0]:  # a panel may have nothing to plot yet
            axis.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=90)
    plt.close(figure)
    return out


def report(config: AblationReportConfig) -> tuple[str, pathlib.Path]:
    """Prints nothing; returns the markdown and the PNG path: the table, then the training
    episodes per sixth of the budget, then (with rows `dqn` and `reference` both run to the
    budget) their comparison, drawn in `pair_out`."""
    root = config.root.expanduser()
    results: dict[str, dict | None] = {}
    records: dict[str, list[dict]] = {}
    for row in config.rows:
        run_dir, kept = root / row, archive_path(config.archive, row) if config.archive else None
        sources = []  # the run directory and the archive: whichever reached more env steps
        if (run_dir / "metrics.jsonl").is_file():
            sources.append(load_metrics(run_dir))
        if kept is not None and kept.is_file():
            sources.append(read_archive(kept))
        if sources:
            records[row] = max(sources, key=env_steps_reached)
        results[row] = row_result(records[row], config.env_steps) if row in records else None
    entries = read_floors(config.floor) if config.floor else []
    floors = {}
    for row in config.rows:
        entry = find_floor(entries, row_evaluation(row, config.env_steps)[1]) if entries else None
        result = results[row] or {}
        rounds = len(result.get("evals_within", []))
        # a row that reached the budget with rounds other than the schedule's (one lost or
        # merged) is not compared with the floor of the schedule's rounds
        if entry and (not result.get("done") or rounds == len(entry["seeds"])):
            floors[row] = floor_of(entry)
        elif entry:
            floors[row] = None
            logger.warning("row %s: %d evaluation rounds, its floor %d: not printed",
                           row, rounds, len(entry["seeds"]))  # fmt: skip
    markdown = table(results, config.env_steps, floors)
    markdown += (
        "\n\nTraining episodes (flags / episodes, mean max x) per sixth of the budget:\n\n"
        + training_table(records, config.env_steps)
    )
    if all(results.get(row) and results[row]["done"] for row in PAIR):
        markdown += "\n\n" + pair_table(records, config.env_steps)
        plot_pair(records, config.env_steps, config.pair_out)
    if config.table_out:
        config.table_out.parent.mkdir(parents=True, exist_ok=True)
        config.table_out.write_text(markdown + "\n")
    return markdown, plot_evals(results, config.env_steps, config.out)


def plot_evals(results: dict[str, dict | None], env_steps: int, out: pathlib.Path) -> pathlib.Path:
    """Eval flag rate and mean max x against env steps, one line per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for row, result in results.items():
        _plot_evals_on(axes[0], axes[1], (result or {}).get("evals", []), env_steps, row)
    return _save(figure, axes, axes[0], axes[1], out)


def row_config(row: str, env_steps: int):
    """The TrainConfig a row's `mario train` runs with (its command line, parsed as `mario
    train` parses it, on today's defaults for what the row does not set: its evaluation)."""
    from launch.config import TrainConfig

    args = command(row, pathlib.Path("row"), env_steps, 10.0)[1:]
    return tyro.cli(TrainConfig, args=args)


def row_evaluation(row: str, env_steps: int):
    """A row's evaluation env, and what a held action's score on it depends on (the floor's
    key): that env less FLOOR_IGNORED_FIELDS, and the rounds' seeds up to the budget."""
    from common.config import config_to_dict

    config = row_config(row, env_steps)
    every = config.eval.every_env_steps
    if every < 1:
        raise ValueError(f"row {row}: evaluation is off (every_env_steps {every}); no floor")
    env_config = config.eval.env(config.env)
    env = config_to_dict(env_config)
    for field in FLOOR_IGNORED_FIELDS:
        env.pop(field)
    rounds = -(-env_steps // every)  # the rounds at every, 2·every, …, and at the budget
    return env_config, {"env": env, "seeds": [config.eval.seeds(i) for i in range(rounds)]}


def find_floor(entries: list[dict], key: dict) -> dict | None:
    """The entry measured on `key`'s evaluation, if any."""
    return next((e for e in entries if (e["env"], e["seeds"]) == (key["env"], key["seeds"])), None)


@dataclasses.dataclass(frozen=True)
class AblationFloorConfig:
    """Plays every action of each row's set held at every step, on the row's evaluation (its
    env, sticky actions and no-ops; the seeds of its rounds up to the budget): the floor the
    row's greedy policy has to beat. Kept in `out` (one entry per distinct evaluation, shared by
    the rows that have it) and printed by `mario ablation report`."""

    rows: tuple[str, ...] = tuple(ROWS)
    """Rows whose floor to measure (rows sharing an evaluation share one entry)."""
    env_steps: int = 300_000
    """The budget: the rounds up to it are played (6 of 10 episodes at the defaults)."""
    out: pathlib.Path = FLOOR_FILE
    """The JSON file of the entries; an entry already there is not played again."""

    def __post_init__(self) -> None:
        _check_rows(self.rows)
        if self.env_steps < 1:
            raise ValueError(f"env_steps ({self.env_steps}) must be >= 1")
        if self.out.suffix != ".json":
            raise ValueError(f"out ({self.out}) must be a .json file")


def read_floors(path: pathlib.Path) -> list[dict]:
    """The entries `floor` kept ([] without the file).

    Raises:
        ValueError: if the file is not a floor file (names it).
    """
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text())["entries"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a floor file: {error!r}") from None
    if not isinstance(entries, list):
        raise ValueError(f"{path} is not a floor file: entries is a {type(entries).__name__}")
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"{path} is not a floor file: entry {index} is not an object")
        missing = sorted({"env", "seeds", "actions", "rows"} - entry.keys())
        if missing:
            raise ValueError(f"{path} is not a floor file: entry {index} lacks {missing}")
        actions = entry["actions"]
        if not (isinstance(actions, dict) and actions and all(
            isinstance(rounds, list) and all(isinstance(r, dict) and {"flags", "x_pos_mean"}
                                             <= r.keys() for r in rounds)
            for rounds in actions.values())):  # fmt: skip
            raise ValueError(f"{path} is not a floor file: entry {index}'s actions are not "
                             "{name: [{flags, x_pos_mean} per round]}")  # fmt: skip
    return entries


def held_action(env_config, action: int, seeds: list[list[int]]) -> list[dict]:
    """Per round: flags and mean max x of `action` held at every step on `seeds`."""
    from common.config import NetworkConfig
    from launch.evaluate import Evaluator, play_on_one_thread

    play_on_one_thread()
    evaluator = Evaluator(env_config, NetworkConfig(), constant_action=action)
    try:
        rounds = []
        for round_seeds in seeds:
            episodes = [evaluator.play(seed) for seed in round_seeds]
            rounds.append({
                "flags": sum(e["flag_get"] for e in episodes),
                "x_pos_mean": float(np.mean([e["max_x_pos"] for e in episodes])),
            })  # fmt: skip
        return rounds
    finally:
        evaluator.close()


def floor(config: AblationFloorConfig) -> list[dict]:
    """Measures the rows' floors not yet in `out` and adds them (written after each entry, so
    an interrupted run keeps what it played); returns the rows' entries, each once."""
    from common.config import ACTION_SETS

    entries = read_floors(config.out)
    wanted = []
    for row in config.rows:
        env_config, key = row_evaluation(row, config.env_steps)
        entry = find_floor(entries, key)
        if entry is None:
            names = ["+".join(buttons) for buttons in ACTION_SETS[env_config.action_set]]
            actions = {}
            for action, name in enumerate(names):
                actions[name] = held_action(env_config, action, key["seeds"])
                logger.info("row %s: %s held: %s", row, name, actions[name])
            entry = {**key, "rows": [], "actions": actions}
            entries.append(entry)
        if row not in entry["rows"]:
            entry["rows"].append(row)
        config.out.parent.mkdir(parents=True, exist_ok=True)
        config.out.write_text(floor_text(entries))
        if entry not in wanted:
            wanted.append(entry)
    return wanted


def floor_text(entries: list[dict]) -> str:
    """The floor file's text: indented JSON with each list of numbers (a round's seeds) on one
    line."""
    text = json.dumps({"entries": entries}, indent=1)
    return re.sub(r"\[[\d\s,.-]+\]", lambda m: json.dumps(json.loads(m.group())), text) + "\n"


def floor_of(entry: dict) -> tuple[str, int, int, float]:
    """The best held action of an entry, by flags then mean max x over its rounds: (its name,
    flags, episodes, mean max x)."""

    def score(item):
        rounds = item[1]
        return (sum(r["flags"] for r in rounds), float(np.mean([r["x_pos_mean"] for r in rounds])))

    name, rounds = max(entry["actions"].items(), key=score)
    flags, x_mean = score((name, rounds))
    return name, flags, sum(len(seeds) for seeds in entry["seeds"]), x_mean


@dataclasses.dataclass(frozen=True)
class AblationArchiveConfig:
    """Keep what the report reads of each row's run in the repository (gzipped JSON lines)."""

    rows: tuple[str, ...] = tuple(ROWS)
    """Rows to archive (those without a run directory are skipped)."""
    root: pathlib.Path = DEFAULT_ROOT
    """Directory holding one run directory per row."""
    out: pathlib.Path = ARCHIVE_DIR
    """Directory of the archives: <row>.jsonl.gz."""

    def __post_init__(self) -> None:
        _check_rows(self.rows)


def archive_path(directory: pathlib.Path, row: str) -> pathlib.Path:
    return directory / f"{row}.jsonl.gz"


def archive(config: AblationArchiveConfig) -> list[pathlib.Path]:
    """Writes ARCHIVE/<row>.jsonl.gz for every row that has a run (launch.plots.archive_run: a
    row whose archive reached more env steps than its run directory is left as it is); returns
    the paths written."""
    written = []
    for row in config.rows:
        run_dir = config.root.expanduser() / row
        if (run_dir / "metrics.jsonl").is_file():
            path = archive_path(config.out, row)
            if archive_run(run_dir, path):
                written.append(path)
    return written
