"""The one training loop of `mario train`, over a backend that runs the roles.

The Trainer owns what every run has, whatever runs the roles: the budget (env steps, minutes),
stop signals, the periodic work (metrics, live display, status file, checkpoints), the final
checkpoint, evaluation during training, the summary, and one shutdown path. It asks its backend
only to start the roles, let them work, report, hand over their state and replay snapshots,
evaluate the latest weights, and stop. Two backends implement that:
`LocalBackend` (every role in this process: `--serial`, the debugging mode) and `RayBackend`
(Ray processes meeting in Redis). Models: Sample Factory's Runner over SerialRunner and
ParallelRunner; Acme's one builder for local and distributed agents.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import fcntl
import json
import logging
import math
import os
import pathlib
import platform
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch
from rich.console import Console
from rich.live import Live
from rich.table import Table

from common.config import config_to_dict
from common.metrics import MetricsLogger
from launch.config import PreparedRun, TrainConfig, prepare_run
from launch.errors import RoleFailed
from launch.evaluate import eval_rank
from launch.reaper import Reaper
from launch.status import STATUS_FILE
from learner.checkpoint import (
    BEST_NAME,
    CHECKPOINT_NAME,
    CheckpointError,
    durable_replace,
    holds_checkpoint,
    load_checkpoint,
    newest_set_file,
    rotate_set,
    round_name,
    save_checkpoint,
    write_manifest,
)

logger = logging.getLogger("train")

# Counters a backend reports (the same in both), and those the Trainer keeps itself.
# The last two are the cost of restarted roles (the Ray backend's learner and shards; always 0
# in the serial one, where nothing restarts).
BACKEND_COUNTERS = ("env_steps", "frames", "updates", "chunks_written", "chunks_inserted",
                    "chunks_rejected", "transitions_written", "updates_lost",
                    "replay_transitions_lost")  # fmt: skip
TRAINER_COUNTERS = ("episodes", "flags")
RATE_WINDOW_S = 5.0
FINAL_EVAL_WAIT_S = 900  # the evaluation that ends a run: 10 episodes take 1–3 min on 2 cores


def replay_snapshot_path(run_dir: pathlib.Path, shard_id: int) -> pathlib.Path:
    """Where shard `shard_id` keeps its replay snapshot (the same layout in both backends)."""
    return run_dir / f"replay-{shard_id}.npz"


def newest_snapshot(run_dir: pathlib.Path, shard_id: int) -> pathlib.Path | None:
    """Shard `shard_id`'s snapshot in the run's newest checkpoint set that has it, if any: what
    a shard restarted in mid-run restores (while a new set is written, the one in previous/)."""
    return newest_set_file(run_dir, replay_snapshot_path(run_dir, shard_id).name)


def episode_record(episode: dict) -> dict:
    """An actor's finished episode (EpisodeResult as a dict, with the "actor" that played it
    and the "policy_version" it played) as the `episode/*` metrics that both backends log.

    Raises:
        KeyError, ValueError, TypeError: a field is missing or not of its type (a record that
            came over the network: the caller counts and drops it).
    """
    return {
        "episode/return": _finite(episode["episode_return"]),
        "episode/length": int(_finite(episode["length"])),
        "episode/x_pos": int(_finite(episode["max_x_pos"])),
        "episode/flag_get": int(bool(episode["flag_get"])),
        "episode/level": _text(episode["level"]),
        "episode/epsilon": _finite(episode["epsilon"]),
        "episode/policy_version": int(_finite(episode["policy_version"])),
        "episode/actor": _text(episode["actor"]),
    }


def _finite(value: object) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"expected a finite number, got {value!r}")
    return number


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected text, got {value!r}")
    return value


class Backend(Protocol):
    """What the Trainer needs from a way of running the roles."""

    name: str
    """"serial" or "ray", for logs and the live display."""

    def start(self, resources: contextlib.ExitStack, checkpoint: dict | None) -> None:
        """Builds and starts the roles, from `checkpoint` when resuming; registers on
        `resources` whatever must be released when the run ends, however it ends."""

    def advance(self, seconds: float) -> None:
        """Lets the roles work for about `seconds`.

        Raises:
            RoleFailed: a role died for good (its own error in the message).
        """

    def counters(self) -> dict[str, int]:
        """Run-wide counters, BACKEND_COUNTERS: env_steps, frames, updates, chunks_*,
        transitions_written, and the work restarts lost (updates_lost, replay_transitions_lost)."""

    def new_episodes(self) -> list[dict]:
        """Episodes finished since the last call, as `episode/*` metric records."""

    def stats(self) -> dict[str, float]:
        """The roles' latest stats (learner/*, replay/*, actors/*, policy and stream lag)."""

    def state(self) -> dict:
        """For a checkpoint: {"learner": CPU copy of its state, "rng": random states}."""

    def snapshot_replay(self, run_dir: pathlib.Path) -> list[pathlib.Path]:
        """Writes each replay shard's contents to replay_snapshot_path(run_dir, shard); returns
        the paths."""

    def start_eval(
        self, seeds: list[int], best_rank: tuple[float, float] | None, video_path: pathlib.Path
    ) -> None:
        """Starts evaluate_round on the latest weights, one greedy episode per seed (in-process:
        runs it now; Ray: in the evaluator worker while training goes on). A failed round is
        logged and skipped in both: the run goes on and the next round is played."""

    def eval_result(self) -> dict | None:
        """The finished evaluation, once: Evaluator.run's summary plus "policy_version" and the
        "weights" it evaluated; {} if it failed; None while none is finished."""

    def stop_roles(self) -> None:
        """Stops the roles: the actors first (they flush their partial chunks into the replay),
        then the learner, then the replay's intake."""


class StopSignals:
    """Turns SIGINT/SIGTERM into a flag the loop checks, so the exit checkpoint gets written."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self) -> StopSignals:
        self.install()
        return self

    def install(self) -> None:
        """Takes the signals (again: ray.init installs a SIGTERM handler of its own)."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            # signal() raises ValueError outside the main thread (e.g. a test runner's thread).
            with contextlib.suppress(ValueError):
                previous = signal.signal(sig, self._handle)
                self._previous.setdefault(sig, previous)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclasses.dataclass
class _Every:
    """A periodic task: `work` runs when `interval_s` has passed since it last ran."""

    interval_s: float
    work: Callable[[], None]
    due: float = 0.0


class Trainer:
    """Runs one prepared run over a backend until its budget is spent or a stop signal."""

    def __init__(
        self,
        run: PreparedRun,
        backend: Backend,
        console: Console | None = None,
        command: list[str] | None = None,
    ):
        """`command`: the command line, recorded in the run's invocations.jsonl once the roles
        have started (a start that is refused trained nothing)."""
        self.run_prepared, self.command = run, command
        self.config: TrainConfig = run.config
        self.run_dir = run.run_dir
        self.checkpoint = run.checkpoint
        self.backend = backend
        self.console = console or Console()
        saved = run.checkpoint["counters"] if run.checkpoint else {}
        self.own_counters = {name: int(saved.get(name, 0)) for name in TRAINER_COUNTERS}
        self.elapsed_before_s = float(saved.get("elapsed_s", 0.0))
        self.recent: collections.deque[dict] = collections.deque(maxlen=100)
        self.counters: dict[str, int] = {}
        self.rates = {f"rate/{name}_per_s": 0.0 for name in ("env_steps", "frames", "updates")}
        self.stats: dict[str, float] = {}
        self.last_checkpoint: dict | None = None
        # Evaluation during training: where the next round starts, and the best so far.
        trainer_state = run.checkpoint.get("trainer", {}) if run.checkpoint else {}
        every = self.config.eval.every_env_steps
        self.eval_round = int(trainer_state.get("eval_round", 0))
        self.next_eval_at = int(trainer_state.get("next_eval_at", every))
        self.best_eval: dict | None = trainer_state.get("best_eval")
        best_path = self.run_dir / BEST_NAME
        if run.checkpoint and best_path.is_file():  # written after the last checkpoint, maybe
            try:
                self.best_eval = {k: v for k, v in load_checkpoint(best_path)["eval"].items()
                                  if k not in ("per_episode", "online")}  # fmt: skip
            except (CheckpointError, KeyError, AttributeError) as error:
                logger.warning("%s is unreadable (%s)", best_path, error)
                self._restore_best(best_path)
        self.last_eval: dict | None = trainer_state.get("last_eval")
        self._eval_started_at: int | None = None
        self._budget_spent = False
        self._stop: StopSignals | None = None
        self._start = time.monotonic()
        self._rate_base: tuple[float, dict[str, int]] | None = None
        self._metrics: MetricsLogger | None = None
        self._live: Live | None = None

    def _restore_best(self, best_path: pathlib.Path) -> None:
        """best.pt again from the kept weights of the checkpoint's best round; without them, the
        next round writes it anew."""
        best = self.best_eval
        kept = self.run_dir / "eval" / round_name(best["env_steps"]) if best else None
        if kept is not None and kept.is_file():
            tmp = best_path.with_suffix(".pt.tmp")
            shutil.copyfile(kept, tmp)
            durable_replace(tmp, best_path)
            logger.warning("%s restored from %s", best_path.name, kept)
            return
        logger.warning("no kept weights of the best round: the next round writes %s anew",
                       best_path.name)  # fmt: skip
        self.best_eval = None

    @property
    def elapsed_s(self) -> float:
        return self.elapsed_before_s + time.monotonic() - self._start

    def run(self) -> dict:
        """Trains; returns the final counters and the run directory.

        Raises:
            RoleFailed: a role died (after the roles were stopped and resources released).
        """
        config = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as resources:
            # Registered first, so told last that the driver cleaned up after itself; if the
            # driver is killed before (kill -9), it kills the processes the run started.
            reaper = Reaper()
            resources.callback(reaper.done)
            # A stop signal during the start ends the run right after it, cleanly.
            stop = self._stop = resources.enter_context(StopSignals())
            self.backend.start(resources, self.checkpoint)
            record_invocation(self.run_prepared, self.command)
            stop.install()  # ray.init installed a SIGTERM handler of its own: ours must win
            self._metrics = MetricsLogger(
                self.run_dir, config_to_dict(config), config.wandb, resume=bool(self.checkpoint)
            )
            resources.callback(quietly, "closing the metrics (W&B)", self._metrics.close)
            if config.live_display:
                self._live = Live(console=self.console, auto_refresh=False)
                self._live.start()
                resources.callback(self._live.stop)
            self._start = time.monotonic()
            failed = True
            try:
                self._loop(stop)
                failed = False
            except RoleFailed:
                raise  # a role's own error: its traceback is in the log already
            except Exception:
                logger.exception("training failed")  # the traceback; `mario train` prints a line
                raise
            finally:
                self._finish(failed)
        summary = {"run_dir": str(self.run_dir), **(self.last_checkpoint or self.counters)}
        self.console.print(f"checkpoint written to {self.run_dir}; {summary}")
        return summary

    def _loop(self, stop: StopSignals) -> None:
        config = self.config
        deadline = self._start + config.minutes * 60 if config.minutes else float("inf")
        checkpoint_s = config.checkpoint_minutes * 60
        tasks = [
            _Every(1.0, self._refresh),
            _Every(config.log_every_s, self._log_metrics),
            _Every(checkpoint_s, self._write_checkpoint, due=self._start + checkpoint_s),
        ]
        while not stop.requested and time.monotonic() < deadline:
            self.backend.advance(0.5)
            self._update_counters()
            if self.counters["env_steps"] >= config.total_env_steps:
                # the budget's round starts in _finish, on the weights the roles end with
                self._budget_spent = True
                break
            self._evaluate()
            now = time.monotonic()
            for task in tasks:
                if now >= task.due:
                    task.work()
                    task.due = now + task.interval_s

    def _finish(self, failed: bool) -> None:
        """Stops the roles and writes the final checkpoint while their state can be read. Each
        step is tried whatever the one before did; after a failure of the run they are best
        effort, so the original error is what the user sees."""
        first_error = None
        started = time.monotonic()
        logger.info("stopping the roles (%s)", "after a failure" if failed else "the run ends")
        try:
            self.backend.stop_roles()
            logger.info("roles stopped in %.1f s", time.monotonic() - started)
        except Exception as error:
            logger.error("stopping the roles failed: %s", error)
            first_error = error
        final_set = None
        if self._budget_spent and not failed:
            # The roles' final state is saved first: a crash during the final evaluation (minutes
            # on Ray) then loses no training, only the round, which a resume plays.
            try:
                final_set = self._write_checkpoint()
            except Exception as error:  # the write below tries again
                logger.error("the checkpoint before the final evaluation was not written (%s)",
                             error)  # fmt: skip
                quietly("reading the counters", self._update_counters)
            # The run's final evaluation: on the weights the learner published last, at the env
            # steps the actors' last chunks brought (as the final checkpoint's).
            quietly("the final evaluation", self._finish_eval)
        try:
            self._write_checkpoint(final_set)
        except Exception as error:
            stands = (
                f"the checkpoint of {self.last_checkpoint['env_steps']:,} env steps stands"
                if self.last_checkpoint
                else "no checkpoint of this invocation was written"
            )
            logger.error("final checkpoint not written (%s); %s", error, stands)
            first_error = first_error or error
        if self.counters:
            quietly("logging the last metrics", self._log_metrics)
            quietly("writing status.json", self._write_status)
        if first_error is not None and not failed:
            raise first_error

    # -- periodic work ----------------------------------------------------------------------------

    def _update_counters(self) -> None:
        """Reads the backend's counters and counts the episodes that finished meanwhile."""
        counters = self.backend.counters()
        for record in self.backend.new_episodes():
            self.own_counters["episodes"] += 1
            self.own_counters["flags"] += int(record["episode/flag_get"])
            self.recent.append(record)
            self._metrics.log(record, counters["env_steps"])
        self.counters = {**counters, **self.own_counters}

    def _evaluate(self) -> None:
        """Starts an evaluation every --eval.every-env-steps; takes the one that finished."""
        every, env_steps = self.config.eval.every_env_steps, self.counters["env_steps"]
        # A round also starts when the budget is reached: the run ends with an evaluation.
        due, total = self.next_eval_at, self.config.total_env_steps
        if owes_final_eval(self.last_eval, total):
            due = min(due, total)
        if every and self._eval_started_at is None and env_steps >= due:
            best = self.best_eval
            best_rank = eval_rank(best["flag_rate"], best["x_pos_mean"]) if best else None
            video = self.run_dir / "eval" / f"best-{env_steps:09d}.mp4"
            self.backend.start_eval(self.config.eval.seeds(self.eval_round), best_rank, video)
            self._eval_started_at = env_steps
            self.eval_round += 1
            self.next_eval_at = (env_steps // every + 1) * every
        if self._eval_started_at is not None:
            result = self.backend.eval_result()
            if result is not None:
                if result:  # empty: the evaluation failed (logged by the backend)
                    self._take_eval(result, self._eval_started_at)
                self._eval_started_at = None

    def _finish_eval(self) -> None:
        """Waits for the round in flight; if it was started before the budget was reached,
        starts and waits for one more on the final weights. A stop signal ends the wait."""
        deadline = time.monotonic() + FINAL_EVAL_WAIT_S
        for _ in range(2):
            if self._eval_started_at is None:
                self._evaluate()  # starts the budget's round unless the last one was at it
            if self._eval_started_at is None:
                return
            logger.info("waiting for the evaluation of %d env steps", self._eval_started_at)
            while self._eval_started_at is not None and time.monotonic() < deadline:
                if self._stop is not None and self._stop.requested:
                    logger.warning("stop requested: the final evaluation is not waited for")
                    return
                time.sleep(0.5)
                self._evaluate()
        if self._eval_started_at is not None:
            logger.warning("the evaluation of %d env steps did not finish in %d s; not logged",
                           self._eval_started_at, FINAL_EVAL_WAIT_S)  # fmt: skip

    def _take_eval(self, result: dict, env_steps: int) -> None:
        """Logs an evaluation; keeps the best weights (by flag rate, then mean max x) as best.pt."""
        summary = {
            "env_steps": env_steps,
            "policy_version": int(result["policy_version"]),
            "flag_rate": result["flag_rate"],
            "x_pos_mean": result["max_x_pos_mean"],
            "x_pos_median": result["max_x_pos_median"],
            "x_pos_max": result["max_x_pos_max"],
            "return_mean": result["return_mean"],
        }
        self.last_eval = summary
        # Logged at the current step (W&B drops steps below its latest); eval/env_steps says
        # which weights were evaluated.
        now = self.counters["env_steps"]
        record = {f"eval/{key}": value for key, value in summary.items()}
        net = "the average of the weights" if self.config.learner.averaged else "the online net"
        logger.info("eval of %s at %d env steps: %s", net, env_steps, summary)
        online = result.get("online")  # --eval.compare-online: the online net on the same seeds
        if online is not None:
            compared = {"flag_rate": online["flag_rate"], "x_pos_mean": online["max_x_pos_mean"],
                        "x_pos_median": online["max_x_pos_median"],
                        "return_mean": online["return_mean"]}  # fmt: skip
            record.update({f"eval_online/{key}": value for key, value in compared.items()})
            logger.info("eval of the online net at %d env steps: %s", env_steps, compared)
        self._metrics.log(record, now)
        if result["video"] is not None:
            self._metrics.log_video("eval/best_episode", result["video"], now)
        evaluated = {  # the weights this round evaluated, as a checkpoint
            "learner": {"online": result["weights"], "updates": summary["policy_version"]},
            "config": config_to_dict(self.config),
            "counters": {
                "env_steps": env_steps,
                "updates": summary["policy_version"],
                "elapsed_s": round(self.elapsed_s, 1),
            },
            "eval": {**summary, "per_episode": result["per_episode"]},
        }
        if online is not None:
            evaluated["eval"]["online"] = {**compared, "per_episode": online["per_episode"]}
        if self.config.eval.keep_weights:
            save_checkpoint(self.run_dir / "eval", evaluated, name=round_name(env_steps))
        rank = eval_rank(summary["flag_rate"], summary["x_pos_mean"])
        best = self.best_eval
        if best is None or rank > eval_rank(best["flag_rate"], best["x_pos_mean"]):
            self.best_eval = summary
            save_checkpoint(self.run_dir, evaluated, name=BEST_NAME)

    def _refresh(self) -> None:
        """Rates over the last interval, the roles' stats, the live table and the status file."""
        now, counters = time.monotonic(), self.counters
        # Over ≥ 5 s: Ray roles add to the counters every 2 s, so 1 s windows would jitter.
        if self._rate_base is None:
            self._rate_base = (now, dict(counters))
        then, before = self._rate_base
        if now - then >= RATE_WINDOW_S:
            self.rates = {
                f"rate/{name}_per_s": (counters.get(name, 0) - before.get(name, 0)) / (now - then)
                for name in ("env_steps", "frames", "updates")
            }
            self._rate_base = (now, dict(counters))
        self.stats = self.backend.stats()
        if self._live is not None:
            self._live.update(self._table(), refresh=True)
        self._write_status()

    def _write_status(self) -> None:
        """status.json: what `mario status` shows of a run without Redis."""
        status = {"mode": self.backend.name, "time": time.time(), "elapsed_s": self.elapsed_s,
                  "counters": self.counters, "rates": self.rates, "last_eval": self.last_eval,
                  "best_eval": self.best_eval}  # fmt: skip
        path = self.run_dir / STATUS_FILE
        path.with_suffix(".tmp").write_text(json.dumps(status) + "\n")
        path.with_suffix(".tmp").replace(path)

    def _log_metrics(self) -> None:
        counters = self.counters
        record = {f"counters/{name}": value for name, value in counters.items()}
        record.update(self.stats)
        record.update(self.rates)
        record.update(elapsed_s=round(self.elapsed_s, 1), wall_time=time.time())
        self._metrics.log(record, counters["env_steps"])

    def _write_checkpoint(self, written: tuple | None = None) -> tuple:
        """Learner state first (read under its lock), then the replay snapshots, then the file
        that names them: a checkpoint never points at a state newer than its snapshots.

        `written`: what an earlier call returned, once the roles have stopped (nothing of
        theirs changed since): its checkpoint is written again with the trainer's evaluation
        state of now, over the same snapshots, in the same set (not rotated)."""
        if written is None:
            state = self.backend.state()
            # read with the state (one moment); the shards take chunks in until their snapshot
            # lock, so a snapshot may hold a few chunks more than the counters say (a resume
            # counts those steps again; read after, steps were counted whose chunks it lacked)
            self._update_counters()
            counters = {**self.counters, "updates": int(state["learner"]["updates"])}
            rotate_set(self.run_dir)  # the last whole set stays in previous/ until sealed
            snapshots = []
            if self.config.snapshot_replay:
                snapshots = self.backend.snapshot_replay(self.run_dir)
        else:
            state, counters, snapshots = written
        counters["elapsed_s"] = round(self.elapsed_s, 1)
        save_checkpoint(
            self.run_dir,
            {
                "learner": state["learner"],
                "config": config_to_dict(self.config),
                "counters": counters,
                "rng": {"torch": torch.get_rng_state(), **state["rng"]},
                "trainer": {
                    **self._eval_schedule(),
                    "best_eval": self.best_eval,
                    "last_eval": self.last_eval,
                },
            },
        )
        names = [CHECKPOINT_NAME, *(path.name for path in snapshots)]
        write_manifest(self.run_dir, names, counters["env_steps"])
        self.last_checkpoint = counters
        return state, counters, snapshots

    def _eval_schedule(self) -> dict[str, int]:
        """Where evaluation goes on after a resume. A round still in flight is saved as not yet
        started, so a resumed run plays it again (same seeds) rather than lose it."""
        if self._eval_started_at is not None:
            return {"eval_round": self.eval_round - 1, "next_eval_at": self._eval_started_at}
        return {"eval_round": self.eval_round, "next_eval_at": self.next_eval_at}

    def _table(self) -> Table:
        config, counters, stats = self.config, self.counters, self.stats
        table = Table(title=f"mario train ({self.backend.name})  level {config.env.level}",
                      show_header=False)  # fmt: skip
        x_positions = [r["episode/x_pos"] for r in self.recent]
        rows = [
            ("env steps", f"{counters.get('env_steps', 0):,} / {config.total_env_steps:,}"),
            ("env frames/s", f"{self.rates.get('rate/frames_per_s', 0):,.0f}"),
            ("updates", f"{counters.get('updates', 0):,} "
                        f"({self.rates.get('rate/updates_per_s', 0):.1f}/s)"),
            ("episodes", f"{counters.get('episodes', 0):,}  flags {counters.get('flags', 0)}"),
            ("mean x_pos (last 100)", f"{np.mean(x_positions) if x_positions else 0:.0f}"),
            ("flags (last 100)", f"{sum(r['episode/flag_get'] for r in self.recent)}"),
            ("replay size", f"{stats.get('replay/size', 0):,}"),
            ("stream lag (chunks)", f"{stats.get('stream_lag_chunks', 0)}"),
            ("policy lag (updates)", f"{stats.get('policy_lag', 0)}"),
            ("last eval", _eval_line(self.last_eval)),
            ("best eval", _eval_line(self.best_eval)),
            ("elapsed", f"{self.elapsed_s / 60:.1f} min"),
            ("time", datetime.datetime.now().strftime("%H:%M:%S")),
        ]  # fmt: skip
        for key, value in rows:
            table.add_row(key, value)
        return table


def owes_final_eval(last_eval: dict | None, total_env_steps: int) -> bool:
    """Whether a run still owes the evaluation it ends with: none yet, or none at its budget."""
    return last_eval is None or last_eval["env_steps"] < total_env_steps


def quietly(what: str, work: Callable[[], object]) -> None:
    """Runs one step of a shutdown; a failure is logged and never hides the run's own error."""
    try:
        work()
    except Exception as error:
        logger.warning("%s failed: %s", what, error)


def _eval_line(summary: dict | None) -> str:
    if summary is None:
        return "-"
    return (f"flags {summary['flag_rate']:.0%}, mean x {summary['x_pos_mean']:.0f} "
            f"at {summary['env_steps']:,} steps")  # fmt: skip


INVOCATIONS_FILE = "invocations.jsonl"


def code_commit() -> dict:
    """The git commit of the code that runs, and whether its tracked files were changed."""
    root = pathlib.Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()  # fmt: skip

    try:
        return {
            "commit": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        }
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def machine() -> dict:
    """What the run ran on: host, CPU count, torch, and the GPU if any."""
    return {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def log_lost_work(run: PreparedRun) -> int:
    """On resume: how far the run had got (its status.json, rewritten every second) beyond the
    checkpoint it resumes from, i.e. the work a crash cost. Logged; returns the env steps."""
    try:
        status = json.loads((run.run_dir / STATUS_FILE).read_text())
        reached = int(status["counters"]["env_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    saved = run.checkpoint["counters"]
    lost = reached - int(saved["env_steps"])
    if lost > 0:
        minutes = (float(status.get("elapsed_s", 0)) - float(saved.get("elapsed_s", 0))) / 60
        logger.warning("the run had reached %d env steps; its checkpoint holds %d: %d env steps "
                       "(%.1f min of training) are lost and will be redone", reached,
                       saved["env_steps"], lost, minutes)  # fmt: skip
    return max(lost, 0)


def record_invocation(run: PreparedRun, command: list[str] | None) -> None:
    """Appends this invocation (time, command, env steps it starts at, commit, machine) to the
    run's invocations.jsonl: with the config in the checkpoint, how the run was made."""
    start = int(run.checkpoint["counters"]["env_steps"]) if run.checkpoint else 0
    record = {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command,
        "start_env_steps": start,
        **({"branched_from": str(run.branched_from)} if run.branched_from else {}),
        **code_commit(),
        "machine": machine(),
    }
    run.run_dir.mkdir(parents=True, exist_ok=True)
    with (run.run_dir / INVOCATIONS_FILE).open("a") as file:
        file.write(json.dumps(record) + "\n")


def train(
    requested: TrainConfig,
    console: Console | None = None,
    given: set[str] | None = None,
    command: list[str] | None = None,
) -> dict:
    """`mario train`: prepares the run (new or resumed), picks its backend, trains.

    The mode comes from the run: a resumed run goes on in the mode it was started in. `given`:
    the config fields set on the command line (see prepare_run); `command`: the command line,
    recorded in the run's invocations.jsonl with the code's commit and the machine.
    """
    named = requested.resume or requested.run_dir
    with contextlib.ExitStack() as held:
        if named is not None and (pathlib.Path(named).is_dir() or requested.resume is None):
            option = "--resume" if requested.resume is not None else "--run-dir"
            held.enter_context(lock_run_dir(pathlib.Path(named), option))
        # A branch reads its parent's newest set while it is prepared (its own set is made
        # then); a branch that has a checkpoint already is resumed instead.
        parent, run_dir = requested.branch_from, requested.run_dir
        with contextlib.ExitStack() as parent_held:
            if (parent is not None and run_dir is not None and pathlib.Path(parent).is_dir()
                    and not holds_checkpoint(pathlib.Path(run_dir))):  # fmt: skip
                parent_held.enter_context(lock_run_dir(pathlib.Path(parent), "--branch-from"))
            run = prepare_run(requested, given)
        if named is None:
            held.enter_context(lock_run_dir(run.run_dir))
        return _train(run, console, command)


RUN_LOCK = ".lock"


@contextlib.contextmanager
def lock_run_dir(run_dir: pathlib.Path, option: str = "--run-dir"):
    """Holds an exclusive lock on the run directory (flock on RUN_LOCK, which names the holder's
    pid) while a `mario train` uses it: a second trainer on the same directory would mix two
    runs' checkpoints and metrics. The kernel drops the lock when the holder dies, however.

    Raises:
        ValueError: the directory is held by another process, named by its pid, and by the
            `option` that gave it.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / RUN_LOCK, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            advice = {
                "--run-dir": ", or pick another --run-dir",
                "--branch-from": " (a branch reads its parent's newest checkpoint set, which a "
                "running parent rewrites)",
            }.get(option, "")
            raise ValueError(
                f"{option} {run_dir} is in use by another mario train (pid {holder}): stop that "
                f"one first{advice}"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _train(run: PreparedRun, console: Console | None, command: list[str] | None) -> dict:
    if run.checkpoint:
        if _budget_spent(run):
            return _nothing_to_train(run, console or Console())
        log_lost_work(run)
    if run.config.serial:
        from launch.local_backend import LocalBackend

        backend = LocalBackend(run.config, run.run_dir)
    else:
        from launch.ray_backend import RayBackend

        # a branch's first start is a new run too: what Redis holds under its name is not its
        new_run = run.checkpoint is None or run.branched_from is not None
        backend = RayBackend(run.config, run.run_dir, new_run=new_run)
    return Trainer(run, backend, console, command).run()


def _budget_spent(run: PreparedRun) -> bool:
    """A resumed run that reached its budget and has its final evaluation (if it evaluates)."""
    counters, total = run.checkpoint["counters"], run.config.total_env_steps
    last_eval = run.checkpoint.get("trainer", {}).get("last_eval")
    evaluated = not run.config.eval.every_env_steps or not owes_final_eval(last_eval, total)
    return run.branched_from is None and counters["env_steps"] >= total and evaluated


def _nothing_to_train(run: PreparedRun, console: Console) -> dict:
    """Nothing is started (a service that restarts the run, docker compose or a RayJob, finds
    it done); the way to train on is a larger budget."""
    counters = run.checkpoint["counters"]
    evaluated = " and has its final evaluation" if run.config.eval.every_env_steps else ""
    console.print(
        f"run {run.run_dir} has spent its budget ({counters['env_steps']:,} of "
        f"--total-env-steps {run.config.total_env_steps:,} env steps){evaluated}: nothing to "
        "train. Give a larger --total-env-steps to go on."
    )
    return {"run_dir": str(run.run_dir), **counters}
