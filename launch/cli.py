"""The `mario` command line: one entry point, subcommands dispatched to frozen-dataclass configs.

A command's module is imported only when that command runs, so `mario grid`, `mario eval`,
`mario plot` and the env/replay/actor benches never import Ray.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import json
import logging
import sys
from collections.abc import Callable

import tyro
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from launch.errors import RoleFailed

console = Console()


def _print_result(title: str, result: dict, path) -> None:
    table = Table(title=title, show_header=False)
    for key, value in result.items():
        table.add_row(key, f"{value:,.3f}" if isinstance(value, float) else str(value))
    console.print(table)
    console.print(f"written: {path}")


def _train(module, config, args: list[str]) -> None:
    from launch.config import given_fields

    module.train(config, console, given_fields(args), command=["mario", "train", *args])


def _eval(module, config, args: list[str]) -> None:
    summary = module.evaluate(config)
    shown = {k: v for k, v in summary.items() if k not in ("per_episode", "videos")}
    _print_result(f"eval of {config.checkpoint}", shown, summary["videos"])
    for index, episode in enumerate(summary["per_episode"]):
        console.print(f"episode {index}: {episode}")


def _export(module, config, args: list[str]) -> None:
    card = module.export(config)
    final = card["final_eval"]
    if final:
        console.print(f"final eval: flag rate {final['flag_rate']:.0%} over {final['episodes']} "
                      f"episodes, max x mean {final['max_x_pos_mean']:.0f}")  # fmt: skip
    console.print(f"written: {config.out} ({card['training']['env_steps']:,} env steps)")


def _pick(module, config, args: list[str]) -> None:
    result = module.pick(config)
    seeds = result["seeds"]
    title = f"rounds of {escape(str(config.run_dir))}, {config.episodes} episodes per seed set"
    if config.average > 1:
        title += f"; each the mean of the weights of up to {config.average} rounds around it"
    table = Table(title=title)
    for column in (
        "env steps",
        "in training",
        *(f"seeds {s}…" for s in seeds),
        "flags",
        "mean max x",
    ):
        table.add_column(column, justify="right")
    for row in result["ranked"]:
        table.add_row(
            f"{row['env_steps']:,}",
            f"{row['train_flag_rate']:.0%}, x {row['train_x_pos_mean']:.0f}"
            + (
                f" (the {len(row['averaged_rounds'])} rounds {row['averaged_rounds'][0]:,}–"
                f"{row['averaged_rounds'][-1]:,}: {row['train_window_flag_rate']:.0%})"
                if row.get("averaged_rounds")
                else ""
            ),
            *(str(row["per_seed"][str(s)]["flags"]) for s in seeds),
            f"{row['flags']} / {row['episodes']}",
            f"{row['x_pos_mean']:.0f}",
        )
    console.print(table)
    for why in result["left_out"].values():
        console.print(f"left out: {why}", soft_wrap=True, markup=False)
    # paths as given: [x] in a folder's name is not markup
    console.print(f"best: {result['export']} --out models/NAME", soft_wrap=True, markup=False)
    console.print(f"written: {result['out']}", soft_wrap=True, markup=False)


def _play(module, config, args: list[str]) -> None:
    result = module.play(config)
    console.print(f"{'flag' if result['flag_get'] else 'no flag'}: max x {result['max_x_pos']}, "
                  f"{result['length']} steps, return {result['return']:.1f}")  # fmt: skip
    console.print(f"written: {result['out']}")


def _status(module, config, args: list[str]) -> None:
    module.show(config, console)


def _plot(module, config, args: list[str]) -> None:
    console.print(f"written: {module.plot(config)}")
    for run_dir in config.run_dirs:
        records = module.load_metrics(run_dir)
        lines = module.describe_milestones(module.milestones(records))
        console.print(f"{run_dir}: greedy evaluation first at " + "; ".join(lines))
        if config.table:
            console.print("\n".join(module.eval_table(records)), markup=False, highlight=False)
            paired = module.paired_episodes(run_dir)
            if paired:
                console.print(
                    f"{run_dir}: {paired['rounds']} rounds played the average of the weights and "
                    f"the online net on the same seeds (eval/round-*.pt): only the average "
                    f"flagged {paired['only_average']} episodes, only the online net "
                    f"{paired['only_online']}, both {paired['both']}, neither "
                    f"{paired['neither']}; exact sign test on those that differ: p = "
                    f"{paired['sign_test_p']:.3f}"
                )


def _ablation_run(module, config, args: list[str]) -> None:
    module.run(config)


def _archive(module, config, args: list[str]) -> None:
    for path, written in module.archive(config):
        console.print(f"{'archived' if written else 'kept (it reached more env steps)'}: {path}")


def _ablation_report(module, config, args: list[str]) -> None:
    markdown, png = module.report(config)
    print(markdown)
    written = [png, config.table_out, config.pair_out if "double DQN" in markdown else None]
    console.print("written: " + ", ".join(str(path) for path in written if path))


def _ablation_archive(module, config, args: list[str]) -> None:
    written = module.archive(config)
    console.print("archived: " + (", ".join(str(path) for path in written) or "no row has a run"))


def _ablation_floor(module, config, args: list[str]) -> None:
    table = Table("rows", "held action", "flags per round", "all rounds: flags / max x")
    for entry in module.floor(config):
        name, flags, episodes, x_mean = module.floor_of(entry)
        rounds = entry["actions"][name]
        table.add_row(", ".join(entry["rows"]), name, " ".join(str(r["flags"]) for r in rounds),
                      f"{flags} of {episodes} / {x_mean:,.0f}")  # fmt: skip
    console.print(table)
    console.print(f"written: {config.out}", markup=False)


def _chaos(module, config, args: list[str]) -> None:
    result = module.run(config)
    for name, ok in result["checks"].items():
        console.print(f"{'[green]ok[/green]' if ok else '[red]FAILED[/red]'} {name}")
    table = Table(
        "t (s)",
        "killed",
        "updates lost",
        "replay transitions lost",
        "env steps not written",
        "env steps / updates until the next kill",
    )
    for row in result["losses"]:
        table.add_row(f"{row['t']:.0f}", row["role"], str(row["updates_lost"]),
                      str(row["replay_transitions_lost"]), str(row["env_steps_not_written"]),
                      f"{row['env_steps_after']} / {row['updates_after']}")  # fmt: skip
    console.print(table)
    console.print(f"final counters: {result['final_counters']}, "
                  f"stream backlog {result['stream_backlog']}")  # fmt: skip
    console.print(f"written: {config.run_dir / 'chaos.json'}")
    if not result["passed"]:
        raise SystemExit(1)


def _grid(module, config, args: list[str]) -> None:
    results, plot_path = module.run(config)
    for algorithm, result in results.items():
        console.print(f"[bold]{algorithm}[/bold] greedy policy (start top-left, G = goal):")
        console.print(result["arrows"])
        console.print(
            f"greedy path {result['path']} return {result['greedy_return']:.0f}; "
            f"mean return of the last 100 training episodes {result['mean_return_last_100']:.2f}\n"
        )
    console.print(f"reward curves: {plot_path}")


def _bench_env(module, config, args: list[str]) -> None:
    result = module.run(config)
    table = Table(
        title=f"env speed, level {result['level']}, one core ({config.seconds:.0f} s each)"
    )
    table.add_column("measurement")
    table.add_column("frames/s", justify="right")
    table.add_column("agent steps/s", justify="right")
    table.add_column("of raw", justify="right")
    raw = result["raw_emulator_frames_per_s"]
    table.add_row("raw emulator (frame_advance loop)", f"{raw:,.0f}", "", "100 %")
    package = result["package_step_frames_per_s"]
    table.add_row("package env step() per frame", f"{package:,.0f}", "", f"{package / raw:.1%}")
    table.add_row(
        "wrapped pipeline (ours)",
        f"{result['pipeline_frames_per_s']:,.0f}",
        f"{result['pipeline_agent_steps_per_s']:,.1f}",
        f"{result['pipeline_fraction_of_raw']:.1%}",
    )
    console.print(table)
    console.print(f"written: {config.out}")
    console.print_json(json.dumps(result))


def _bench_replay(module, config, args: list[str]) -> None:
    _print_result("replay speed (one core)", module.run(config), config.out)


def _bench_actor(module, config, args: list[str]) -> None:
    _print_result("actor path vs raw emulator (one core)", module.run(config), config.out)


def _bench_learner(module, config, args: list[str]) -> None:
    result = module.run(config)
    table = Table(title=f"learner updates/s ({config.seconds:g} s each; torch {result['torch']})")
    for column in ("device", "threads", "batch", "variant", "updates/s", "samples/s", "warm-up s"):
        table.add_column(column, justify="right")
    for row in result["rows"]:
        table.add_row(row["device"], str(row["threads"] or ""), str(row["batch_size"]),
                      row["variant"], f"{row['updates_per_s']:,.1f}",
                      f"{row['samples_per_s']:,.0f}", f"{row['warm_up_s']:.1f}")  # fmt: skip
    console.print(table)
    console.print(f"written: {config.out}")


def _bench_feed(module, config, args: list[str]) -> None:
    result = module.run(config)
    table = Table(title=f"replay → learner through Ray ({config.seconds:g} s each, "
                        f"{result['cpus']} CPUs)")  # fmt: skip
    for column in ("shards", "batch", "prefetch", "per request", "batches/s", "samples/s"):
        table.add_column(column, justify="right")
    for row in result["rows"]:
        table.add_row(str(row["shards"]), str(row["batch_size"]), str(row["prefetch"]),
                      str(row["batches_per_request"]), f"{row['batches_per_s']:,.1f}",
                      f"{row['samples_per_s']:,.0f}")  # fmt: skip
    console.print(table)
    console.print(f"written: {config.out}")


def _bench_system(module, config, args: list[str]) -> None:
    result = module.run(config, console)
    modes = [mode for mode in ("distributed", "serial") if mode in result]
    table = Table(title=f"system, {result['seconds_each']:.0f} s per mode")
    table.add_column("metric")
    for mode in modes:
        table.add_column(mode, justify="right")
    for key in result["distributed"]:
        table.add_row(key, *(f"{result[mode][key]:,.2f}" for mode in modes))
    console.print(table)
    console.print(f"written: {config.out}")


def _churn(module, config, args: list[str]) -> None:
    result = module.churn(config)
    source = escape(result["states_from"])
    table = Table(title=f"greedy changes between the kept rounds of {escape(str(config.run_dir))}, "
                        f"on {result['states']:,} states of {source}")  # fmt: skip
    for column in ("env steps", "eval flags", "greedy changed", "gap median",
                   f"gap < {config.small_gap:g}", "mean max Q"):  # fmt: skip
        table.add_column(column, justify="right")
    for row in result["rounds"]:
        changed = row["greedy_changed"]
        table.add_row(f"{row['env_steps']:,}",
                      "" if row["flag_rate"] is None else f"{row['flag_rate']:.0%}",
                      "" if changed is None else f"{changed:.1%}", f"{row['gap_median']:.3f}",
                      f"{row['small_gap_share']:.1%}", f"{row['max_q_mean']:.2f}")  # fmt: skip
    console.print(table)
    mean = result["mean_greedy_changed"]
    console.print(("" if mean is None else f"greedy action changed on {mean:.1%} of the states "
                   "from one round to the next, on average; ")
                  + f"median gap {result['mean_gap_median']:.3f} (mean over rounds)")  # fmt: skip
    for path, why in result["left_out"].items():
        console.print(f"left out {escape(path)}: {escape(why)}", soft_wrap=True)
    console.print(f"written: {result['out']}")


@dataclasses.dataclass(frozen=True)
class _Command:
    module: str
    """Module holding the config class and the work (imported only when the command runs)."""
    config: str
    """Name of the frozen config dataclass in `module`."""
    run: Callable
    """(module, parsed config, command-line args) → None."""
    help: str


COMMANDS: dict[tuple[str, ...], _Command] = {
    ("train",): _Command("launch.trainer", "TrainConfig", _train,
                         "train double DQN on Mario (Ray; --serial: one process)"),
    ("eval",): _Command("launch.evaluate", "EvalConfig", _eval,
                        "evaluate a checkpoint; stats and mp4"),
    ("export",): _Command("launch.model", "ExportConfig", _export,
                          "a run's best weights as a model folder with its card"),
    ("pick",): _Command("launch.pick", "PickConfig", _pick,
                        "which kept eval round to ship: the best few, more episodes"),
    ("churn",): _Command("launch.churn", "ChurnConfig", _churn,
                         "how often the greedy action changes between kept rounds"),
    ("play",): _Command("launch.model", "PlayConfig", _play,
                        "play one episode of a model; GIF or mp4"),
    ("status",): _Command("launch.status", "StatusConfig", _status,
                          "a run's state, read from Redis (or its status.json)"),
    ("plot",): _Command("launch.plots", "PlotConfig", _plot, "learning curve of runs as PNG"),
    ("archive",): _Command("launch.plots", "ArchiveConfig", _archive,
                           "a run's curves and eval rounds as one small file (docs/runs)"),
    ("ablation", "run"): _Command("launch.ablation", "AblationRunConfig", _ablation_run,
                                  "train recipe rows on 1-1 at one budget"),
    ("ablation", "report"): _Command("launch.ablation", "AblationReportConfig", _ablation_report,
                                     "the rows' eval results: table and PNG"),
    ("ablation", "archive"): _Command("launch.ablation", "AblationArchiveConfig",
                                      _ablation_archive, "keep the rows' results in the repo"),
    ("ablation", "floor"): _Command("launch.ablation", "AblationFloorConfig", _ablation_floor,
                                    "what holding one action scores on each row's eval"),
    ("chaos",): _Command("launch.chaos", "ChaosConfig", _chaos,
                         "train while killing random roles; check the books"),
    ("grid",): _Command("launch.grid_world", "GridConfig", _grid,
                        "tabular Q vs double Q on the 3×3 grid"),
    ("bench", "env"): _Command("launch.bench.env", "BenchEnvConfig", _bench_env,
                               "emulator vs wrapped-env speed"),
    ("bench", "replay"): _Command("launch.bench.replay", "BenchReplayConfig", _bench_replay,
                                  "replay insert/sample rates, bytes/item"),
    ("bench", "actor"): _Command("launch.bench.actor", "BenchActorConfig", _bench_actor,
                                 "actor path speed vs raw emulator"),
    ("bench", "learner"): _Command("launch.bench.learner", "BenchLearnerConfig", _bench_learner,
                                   "learner updates/s: batch, threads, compile, bf16, ..."),
    ("bench", "feed"): _Command("launch.bench.feed", "BenchFeedConfig", _bench_feed,
                                "batches/s replay shards serve a learner via Ray"),
    ("bench", "system"): _Command("launch.bench.system", "BenchSystemConfig", _bench_system,
                                  "Ray vs serial trainer speed"),
}  # fmt: skip


def _usage(group: tuple[str, ...] = ()) -> str:
    name = " ".join(("mario", *group))
    lines = [f"usage: {name} COMMAND [--help] [OPTIONS]", "", "commands:"]
    for words, command in COMMANDS.items():
        if words[: len(group)] == group:
            lines.append(f"  {' '.join(words):<16} {command.help}")
    return "\n".join(lines)


def _unknown(argv: list[str]) -> str:
    """The error for a command line that names no command, with the nearest command."""
    typed = " ".join(word for word in argv if not word.startswith("-")) or " ".join(argv)
    names = [" ".join(words) for words in COMMANDS] + sorted({words[0] for words in COMMANDS})
    nearest = difflib.get_close_matches(typed, names, n=1, cutoff=0.5)
    hint = f"; did you mean 'mario {nearest[0]}'?" if nearest else ""
    return f"mario: unknown command {typed!r}{hint}"


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `mario` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for words, command in sorted(COMMANDS.items(), key=lambda item: -len(item[0])):
        if tuple(argv[: len(words)]) == words:
            _run(words, command, argv[len(words) :])
            return
    groups = {words[:-1] for words in COMMANDS if len(words) > 1}
    for group in groups:  # `mario bench`, `mario bench --help`
        if tuple(argv[: len(group)]) == group and all(a in ("-h", "--help") for a in argv[1:]):
            print(_usage(group))
            if len(argv) == len(group):
                raise SystemExit(2)
            return
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        if not argv:
            raise SystemExit(2)
        return
    print(f"{_unknown(argv)}\n\n{_usage()}", file=sys.stderr)
    raise SystemExit(2)


def _run(words: tuple[str, ...], command: _Command, args: list[str]) -> None:
    module = importlib.import_module(command.module)
    prog = "mario " + " ".join(words)
    try:
        config = tyro.cli(
            getattr(module, command.config), args=args, prog=prog, description=command.help
        )
    except ValueError as error:  # raised by a config's __post_init__ validation
        console.print(f"[red]error:[/red] {error}", soft_wrap=True)  # a path stays whole
        raise SystemExit(2) from None
    try:
        command.run(module, config, args)
    except (ValueError, OSError) as error:  # bad checkpoint, snapshot, path or setting
        console.print(f"[red]error:[/red] {error}", soft_wrap=True)  # a path stays whole
        raise SystemExit(1) from None
    except RoleFailed as error:  # the role's own error; its traceback went to the log
        console.print(f"[red]error:[/red] {error}", soft_wrap=True)  # a path stays whole
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
