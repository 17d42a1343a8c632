"""The in-process backend (`mario train --serial`): actor, replay and learner in one loop.

The role cores that the Ray backend runs in separate processes run here in this one, without
Redis or Ray: learn whenever the replay's rate limiter allows a batch, act otherwise. The first
thing to try when debugging, and the fastest way to run the tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import pathlib
import time

from launch.config import TrainConfig
from launch.errors import RoleFailed
from launch.evaluate import evaluate_round
from launch.roles import RoleSpecs, build_actor, build_evaluator, build_learner, build_replay
from launch.trainer import BACKEND_COUNTERS, episode_record, replay_snapshot_path
from learner.checkpoint import SET_DIR_KEY
from learner.learner import cpu_copy
from learner.runner import LearnerMeter

logger = logging.getLogger("serial")


class LocalBackend:
    """Every role in this process; the Trainer calls advance() to let them work."""

    name = "serial"

    def __init__(self, config: TrainConfig, run_dir: pathlib.Path):
        self.config = config
        self.run_dir = run_dir
        self.specs = RoleSpecs(config)
        self._counters = dict.fromkeys(BACKEND_COUNTERS, 0)
        self._episodes: list[dict] = []
        self._last_metrics: dict[str, float] = {}
        self._actor_rate_base: tuple[float, int, int] | None = None
        self._evaluator = None
        self._eval_result: dict | None = None

    def start(self, resources: contextlib.ExitStack, checkpoint: dict | None) -> None:
        resources.callback(self._close_evaluator)
        self.learner = build_learner(
            self.specs.learner(), checkpoint["learner"] if checkpoint else None
        )
        self.replay = build_replay(self.specs.replay(0))
        self.actor = build_actor(self.specs.actor(0, epsilon_band=0, epsilon_bands=1))
        resources.callback(self.actor.close)
        self.meter = LearnerMeter(self.learner)
        if checkpoint is not None:
            saved = checkpoint["counters"]
            for name in self._counters:
                self._counters[name] = int(saved.get(name, 0))
            # the snapshot of the checkpoint's own set (previous/ after a fallback)
            snapshot = replay_snapshot_path(checkpoint.get(SET_DIR_KEY, self.run_dir), 0)
            if snapshot.exists():
                self.replay.restore(snapshot)
            rng = checkpoint.get("rng", {})
            if "actor" in rng and "replay" in rng:
                self.actor.rng.bit_generator.state = rng["actor"]
                self.replay.rng.bit_generator.state = rng["replay"]
        self.actor.set_weights(self.learner.cpu_weights(), self.learner.updates)

    def advance(self, seconds: float) -> None:
        actor, replay, learner = self.actor, self.replay, self.learner
        batch_size = self.config.learner.batch_size
        actor.set_run_env_steps(self._counters["env_steps"] + actor.env_steps)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if replay.can_sample(batch_size):
                sample = replay.sample(batch_size)
                try:
                    self._last_metrics, td_abs = learner.update(sample)
                except Exception as error:
                    logger.exception("the learner failed")
                    raise RoleFailed.of("the learner", error) from error
                replay.update_priorities(sample.keys, td_abs)
                if learner.updates % self.config.publish_every_updates == 0:
                    actor.set_weights(learner.cpu_weights(), learner.updates)
                continue
            acting_since = time.monotonic()
            try:
                finished = actor.step()
            except Exception as error:
                logger.exception("actor 0 failed")
                raise RoleFailed.of("actor 0", error) from error
            self._insert(actor.take_chunks())
            for episode in finished:
                record = {**dataclasses.asdict(episode), "actor": "actor-0",
                          "policy_version": actor.policy_version}  # fmt: skip
                self._episodes.append(episode_record(record))
            self.meter.waited(time.monotonic() - acting_since)

    def _insert(self, chunks) -> None:
        for chunk in chunks:
            self.replay.insert(chunk)
            self._counters["chunks_written"] += 1
            self._counters["chunks_inserted"] += 1
            self._counters["transitions_written"] += len(chunk)

    def counters(self) -> dict[str, int]:
        return {
            **self._counters,
            # the actor counts from 0; _counters hold the checkpoint's counts
            "env_steps": self._counters["env_steps"] + self.actor.env_steps,
            "frames": self._counters["frames"] + self.actor.frames,
            "updates": self.learner.updates,
        }

    def new_episodes(self) -> list[dict]:
        episodes, self._episodes = self._episodes, []
        return episodes

    def stats(self) -> dict[str, float]:
        now, actor = time.monotonic(), self.actor
        steps_per_s = frames_per_s = 0.0
        if self._actor_rate_base is not None:
            then, steps, frames = self._actor_rate_base
            interval = max(now - then, 1e-9)
            steps_per_s = (actor.env_steps - steps) / interval
            frames_per_s = (actor.frames - frames) / interval
        self._actor_rate_base = (now, actor.env_steps, actor.frames)
        return {
            **self.meter.report(self._last_metrics),
            **self.replay.stats(),
            "actors/running": 1,
            "actors/lost": 0,
            "actors/env_steps_per_s": steps_per_s,
            "actors/frames_per_s": frames_per_s,
            "actors/actor-0/frames_per_s": frames_per_s,
            "policy_lag": self.learner.updates - actor.policy_version,
            "stream_lag_chunks": 0,
            "driver/malformed_records": 0,  # nothing reaches this driver through Redis
        }

    def state(self) -> dict:
        return {
            "learner": cpu_copy(self.learner.state_dict()),
            "rng": {
                "actor": self.actor.rng.bit_generator.state,
                "replay": self.replay.rng.bit_generator.state,
            },
        }

    def snapshot_replay(self, run_dir: pathlib.Path) -> list[pathlib.Path]:
        path = replay_snapshot_path(run_dir, 0)
        self.replay.snapshot(path)
        return [path]

    def start_eval(self, seeds: list[int], best_rank, video_path: pathlib.Path) -> None:
        learner = self.learner
        weights = learner.cpu_weights(learner.evaluated_net)
        compare = learner.evaluated_net == "ema" and self.config.eval.compare_online
        online = learner.cpu_weights() if compare else None
        try:
            if self._evaluator is None:
                self._evaluator = build_evaluator(self.config)
            result = evaluate_round(self._evaluator, weights, seeds, best_rank, video_path, online)
        except Exception as error:  # as in the Ray backend: the round is lost, not the run
            logger.warning("evaluation failed: %s", error, exc_info=True)
            self._eval_result = {}
            self._close_evaluator()  # the next round builds a new one (Ray: a new process)
            return
        self._eval_result = {**result, "policy_version": self.learner.updates, "weights": weights}

    def eval_result(self) -> dict | None:
        result, self._eval_result = self._eval_result, None
        return result

    def _close_evaluator(self) -> None:
        evaluator, self._evaluator = self._evaluator, None
        if evaluator is not None:
            with contextlib.suppress(Exception):  # a broken one may fail to close
                evaluator.close()

    def stop_roles(self) -> None:
        # Partial chunks: keep the experience (only the ≤ n transitions per env that wait for a
        # value are lost).
        self._insert(self.actor.take_chunks(flush=True))
