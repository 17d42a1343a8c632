"""`mario status`: a run's state from any terminal: from Redis while a Ray run is up, else from
the status.json the trainer rewrites every second (serial runs, finished runs)."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import redis
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from common.redis_io import RedisConfig, RedisKeys, check_redis_url, connect
from common.wire import WireError, decode_record

STATUS_FILE = "status.json"  # rewritten every second by the trainer (launch.trainer)


@dataclasses.dataclass(frozen=True)
class StatusConfig:
    """Show a run's counters, rates, heartbeats and lags."""

    run_dir: pathlib.Path | None = None
    """Run directory (its redis_url file and name locate the run); default: runs/<run id> with
    --run-id, else the newest in runs/."""
    redis_url: str | None = None
    """Redis URL (default: the one the run wrote to <run dir>/redis_url)."""
    run_id: str | None = None
    """Run id (default: the run directory's name)."""
    watch: bool = False
    """Refresh every 2 s until Ctrl-C."""
    healthy_within: float | None = None
    """Health check (a container's HEALTHCHECK): exit 1 unless the learner and at least one actor
    sent a heartbeat within this many seconds."""
    redis: RedisConfig = dataclasses.field(default_factory=RedisConfig)

    def __post_init__(self) -> None:
        check_redis_url(self.redis_url)


def _resolve(config: StatusConfig) -> tuple[pathlib.Path | None, str | None, str]:
    """(run directory, Redis URL or None, run id)."""
    run_dir = config.run_dir
    if run_dir is None and config.run_id is not None:  # runs/<run id>, not the newest run
        named = pathlib.Path("runs") / config.run_id
        if named.is_dir():
            run_dir = named
        elif config.redis_url is None:
            raise FileNotFoundError(
                f"no run directory {named} for run_id {config.run_id!r}: pass --run-dir, or "
                "--redis-url with the run id"
            )
    if run_dir is None and (config.redis_url is None or config.run_id is None):
        runs = pathlib.Path("runs")
        candidates = sorted(
            [*runs.glob("*/redis_url"), *runs.glob(f"*/{STATUS_FILE}")],
            key=lambda p: p.stat().st_mtime,
        )
        if not candidates:
            raise FileNotFoundError("no run found under runs/; pass --run-dir or --redis-url")
        run_dir = candidates[-1].parent
    url = config.redis_url
    if url is None:
        path = pathlib.Path(run_dir) / "redis_url"
        if path.is_file():
            url = path.read_text().strip()
        elif not (pathlib.Path(run_dir) / STATUS_FILE).is_file():
            raise FileNotFoundError(f"{run_dir} has neither redis_url nor {STATUS_FILE}")
    return run_dir, url, config.run_id or pathlib.Path(run_dir).name


def file_snapshot(run_dir: pathlib.Path) -> dict:
    """The run's status.json, which the trainer rewrites every second (both modes)."""
    path = pathlib.Path(run_dir) / STATUS_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise FileNotFoundError(f"cannot read {path}: {error}") from error
    state["age_s"] = time.time() - float(state["time"])
    return state


def render_evals(state: dict) -> Table:
    """The last and the best evaluation during training."""
    table = Table(title="evaluation (greedy, sticky 0.25)")
    for column in ("round", "env steps", "flag rate", "max x mean", "median", "max"):
        table.add_column(column, justify="right")
    for name in ("last_eval", "best_eval"):
        summary = state.get(name)
        if summary:
            table.add_row(name.removesuffix("_eval"), f"{summary['env_steps']:,}",
                          f"{summary['flag_rate']:.0%}", f"{summary['x_pos_mean']:.0f}",
                          f"{summary['x_pos_median']:.0f}", str(summary["x_pos_max"]))  # fmt: skip
    return table


def render_file(run_id: str, state: dict) -> Table:
    table = Table(title=f"run {run_id} ({state['mode']}; {STATUS_FILE} written "
                        f"{state['age_s']:.0f} s ago)", show_header=False)  # fmt: skip
    for key, value in sorted(state["counters"].items()):
        table.add_row(key, f"{value:,}")
    for key, value in sorted(state["rates"].items()):
        table.add_row(key, f"{value:,.1f}")
    table.add_row("elapsed", f"{state['elapsed_s'] / 60:.1f} min")
    return table


def snapshot(client, keys: RedisKeys) -> dict:
    """Everything `mario status` shows, as plain data. An entry that does not parse (a counter,
    a role's stats record or heartbeat) is left out and named in "malformed"."""
    now = time.time()
    malformed: list[str] = []

    def parsed(where: str, entries: dict, parse) -> dict:
        kept = {}
        for key, value in entries.items():
            name = key.decode(errors="replace")
            try:
                kept[name] = parse(value)
            except (WireError, ValueError, TypeError, OverflowError):
                malformed.append(f"{where} {name!r}")
        return kept

    counters = parsed("counter", client.hgetall(keys.counters), int)
    stats = parsed("stats of", client.hgetall(keys.stats), decode_record)
    beats = parsed("heartbeat of", client.hgetall(keys.heartbeats), lambda v: now - float(v))
    try:
        version = int(client.get(keys.weights_version) or 0)
    except ValueError:
        version = 0
        malformed.append("the weights version")
    return {
        "counters": counters,
        "stats": stats,
        "heartbeat_age_s": beats,
        "weights_version": version,
        "stream_lag_chunks": client.xlen(keys.experience),
        "malformed": malformed,
    }


def health_problems(state: dict, within_s: float) -> list[str]:
    """Why the run is not healthy (empty: healthy): stale or missing heartbeats."""
    ages = state["heartbeat_age_s"]
    problems = []
    if "learner" not in ages:
        problems.append("no learner heartbeat")
    elif ages["learner"] > within_s:
        problems.append(f"learner heartbeat {ages['learner']:.0f} s old")
    actor_ages = [age for role, age in ages.items() if role.startswith("actor-")]
    if not actor_ages:
        problems.append("no actor heartbeat")
    elif min(actor_ages) > within_s:
        problems.append(f"newest actor heartbeat {min(actor_ages):.0f} s old")
    return problems


def render(run_id: str, state: dict) -> Group:
    overview = Table(title=f"run {run_id}", show_header=False)
    for key, value in sorted(state["counters"].items()):
        overview.add_row(key, f"{value:,}")
    overview.add_row("weights version", str(state["weights_version"]))
    overview.add_row("stream lag (chunks)", str(state["stream_lag_chunks"]))
    roles = Table(title="roles")
    for column in ("role", "heartbeat age", "frames/s", "policy version", "updates/s", "loss"):
        roles.add_column(column)
    for role, age in sorted(state["heartbeat_age_s"].items()):
        stats = state["stats"].get(role, {})
        roles.add_row(
            role,
            f"{age:.1f} s",
            _number(stats, "frames_per_s", ",.0f"),
            _number(stats, "policy_version", ""),
            _number(stats, "learner/updates_per_s", ".1f"),
            _number(stats, "learner/loss", ".3f"),
        )
    if not state.get("malformed"):
        return Group(overview, roles)
    skipped = "malformed entries skipped: " + ", ".join(state["malformed"])
    return Group(overview, roles, skipped)


def _number(stats: dict, name: str, spec: str) -> str:
    value = stats.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return ""
    return format(value, spec)


def show(config: StatusConfig, console: Console) -> dict:
    run_dir, url, run_id = _resolve(config)
    client, keys = None, RedisKeys(run_id)
    if url is not None:
        client = connect(url, config.redis)
        try:
            snapshot(client, keys)
        except redis.RedisError as error:
            if run_dir is None or not (pathlib.Path(run_dir) / STATUS_FILE).is_file():
                raise ConnectionError(
                    f"cannot read run {run_id} from Redis at {url} ({error}); an embedded Redis "
                    "stops when its run stops"
                ) from error
            console.print(f"Redis at {url} is unreachable ({error}): showing {STATUS_FILE}")
            client = None

    def read() -> tuple[dict, object]:
        if client is None:
            state = file_snapshot(run_dir)
            return state, Group(render_file(run_id, state), render_evals(state))
        state = snapshot(client, keys)
        has_file = run_dir is not None and (pathlib.Path(run_dir) / STATUS_FILE).is_file()
        if not has_file:
            return state, render(run_id, state)
        evals = file_snapshot(run_dir)  # evaluation lives in the trainer's status.json
        state.update(last_eval=evals.get("last_eval"), best_eval=evals.get("best_eval"))
        return state, Group(render(run_id, state), render_evals(state))

    state, view = read()
    if config.healthy_within is not None:
        if client is not None:
            problems = health_problems(state, config.healthy_within)
        elif state["age_s"] > config.healthy_within:
            problems = [f"{STATUS_FILE} {state['age_s']:.0f} s old"]
        else:
            problems = []
        console.print(f"run {run_id}: " + ("; ".join(problems) if problems else "healthy"))
        if state.get("malformed"):
            console.print("malformed entries skipped: " + ", ".join(state["malformed"]))
        if problems:
            raise SystemExit(1)
        return state
    if not config.watch:
        console.print(view)
        return state
    with Live(view, console=console, auto_refresh=False) as live:
        try:
            while True:
                time.sleep(2)
                state, view = read()
                live.update(view, refresh=True)
        except KeyboardInterrupt:
            pass
    return state
