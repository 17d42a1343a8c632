"""The `mario` command line: one entry point, subcommands dispatched to frozen-dataclass configs."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections.abc import Callable

import tyro
from rich.console import Console
from rich.table import Table

from common import (
    bench_actor,
    bench_env,
    bench_replay,
    bench_system,
    evaluate,
    grid_world,
    plots,
    status,
    train,
)

console = Console()


def _grid(config: grid_world.GridConfig) -> None:
    results, plot_path = grid_world.run(config)
    for algorithm, result in results.items():
        console.print(f"[bold]{algorithm}[/bold] greedy policy (start top-left, G = goal):")
        console.print(result["arrows"])
        console.print(
            f"greedy path {result['path']} return {result['greedy_return']:.0f}; "
            f"mean return of the last 100 training episodes {result['mean_return_last_100']:.2f}\n"
        )
    console.print(f"reward curves: {plot_path}")


def _bench_env(config: bench_env.BenchEnvConfig) -> None:
    result = bench_env.run(config)
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


def _print_result(title: str, result: dict, path) -> None:
    table = Table(title=title, show_header=False)
    for key, value in result.items():
        table.add_row(key, f"{value:,.3f}" if isinstance(value, float) else str(value))
    console.print(table)
    console.print(f"written: {path}")


def _bench_replay(config: bench_replay.BenchReplayConfig) -> None:
    _print_result("replay speed (one core)", bench_replay.run(config), config.out)


def _bench_actor(config: bench_actor.BenchActorConfig) -> None:
    _print_result("actor path vs raw emulator (one core)", bench_actor.run(config), config.out)


def _train(config: train.TrainConfig) -> None:
    if config.serial:
        train.train_serial(config, console)
    else:
        from common.distributed import train_distributed

        train_distributed(config, console)


def _eval(config: evaluate.EvalConfig) -> None:
    summary = evaluate.evaluate(config)
    shown = {k: v for k, v in summary.items() if k not in ("per_episode", "videos")}
    _print_result(f"eval of {config.checkpoint}", shown, summary["videos"])
    for index, episode in enumerate(summary["per_episode"]):
        console.print(f"episode {index}: {episode}")


def _bench_system(config) -> None:
    result = bench_system.run(config, console)
    table = Table(title=f"system, {result['seconds_each']:.0f} s per mode")
    table.add_column("metric")
    for mode in ("distributed", "serial"):
        if mode in result:
            table.add_column(mode, justify="right")
    for key in result["distributed"]:
        row = [f"{result[mode][key]:,.2f}" for mode in ("distributed", "serial")
               if mode in result and key in result[mode]]  # fmt: skip
        table.add_row(key, *row)
    console.print(table)
    console.print(f"written: {config.out}")


def _status(config: status.StatusConfig) -> None:
    status.show(config, console)


def _plot(config: plots.PlotConfig) -> None:
    console.print(f"written: {plots.plot(config)}")


@dataclasses.dataclass(frozen=True)
class _Command:
    config_type: type
    run: Callable
    help: str


COMMANDS: dict[tuple[str, ...], _Command] = {
    ("train",): _Command(
        train.TrainConfig, _train, "train double DQN on Mario (distributed; --serial: one process)"
    ),
    ("eval",): _Command(evaluate.EvalConfig, _eval, "evaluate a checkpoint; stats and mp4"),
    ("status",): _Command(status.StatusConfig, _status, "a run's state, read from Redis"),
    ("plot",): _Command(plots.PlotConfig, _plot, "learning curve of runs as PNG"),
    ("grid",): _Command(grid_world.GridConfig, _grid, "tabular Q vs double Q on the 3×3 grid"),
    ("bench", "env"): _Command(
        bench_env.BenchEnvConfig, _bench_env, "emulator vs wrapped-env speed"
    ),
    ("bench", "system"): _Command(
        bench_system.BenchSystemConfig, _bench_system, "distributed vs serial trainer speed"
    ),
    ("bench", "replay"): _Command(
        bench_replay.BenchReplayConfig, _bench_replay, "replay insert/sample rates, bytes/item"
    ),
    ("bench", "actor"): _Command(
        bench_actor.BenchActorConfig, _bench_actor, "actor path speed vs raw emulator"
    ),
}


def _usage() -> str:
    lines = ["usage: mario COMMAND [--help] [OPTIONS]", "", "commands:"]
    for words, command in COMMANDS.items():
        lines.append(f"  {' '.join(words):<14} {command.help}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `mario` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for words, command in sorted(COMMANDS.items(), key=lambda item: -len(item[0])):
        if tuple(argv[: len(words)]) == words:
            prog = "mario " + " ".join(words)
            try:
                config = tyro.cli(
                    command.config_type,
                    args=argv[len(words) :],
                    prog=prog,
                    description=command.help,
                )
            except ValueError as error:  # raised by a config's __post_init__ validation
                console.print(f"[red]error:[/red] {error}")
                raise SystemExit(2) from None
            try:
                command.run(config)
            except (ValueError, OSError) as error:  # bad checkpoint, snapshot or path
                console.print(f"[red]error:[/red] {error}")
                raise SystemExit(1) from None
            return
    if argv and argv[0] in ("-h", "--help"):
        print(_usage())
        return
    bad = " ".join(argv) if argv else "(none)"
    print(f"mario: unknown command {bad!r}\n\n{_usage()}", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    main()
