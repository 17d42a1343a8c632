"""`mario train`: all process wiring of the distributed trainer, in one place.

Redis carries experience (actors → shards) and weights (learner → actors); Ray places and
restarts the processes and carries sample batches (shards → learner) through its object
store. The role classes (ActorRunner, ReplayShard, LearnerRunner) know nothing of Ray: this
module wraps each in a Ray actor and connects them (`connect_components`).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import logging
import os
import pathlib
import threading
import time

import msgpack
import numpy as np
import ray
import torch
from rich.console import Console
from rich.live import Live
from rich.table import Table

from actors.runner import ActorRunner, ActorRunnerConfig
from common.config import config_to_dict
from common.metrics import MetricsLogger
from common.redis_io import EmbeddedRedis, RedisKeys, connect
from learner.checkpoint import save_checkpoint
from learner.runner import LearnerRunner, LearnerRunnerConfig
from replay_server.shard import ReplayShard

logger = logging.getLogger("distributed")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Processes of the distributed trainer."""

    num_actors: int | None = None
    """Actor processes (1 CPU each); None: CPU count − 1, at least 1."""
    num_shards: int = 1
    """Replay shards."""
    prefetch: int = 4
    """Sample requests the learner keeps in flight."""
    weights_poll_frames: int = 400
    """Emulator frames between an actor's checks of the weights version."""

    def __post_init__(self) -> None:
        if self.num_actors is not None and self.num_actors < 1:
            raise ValueError(f"num_actors ({self.num_actors}) must be >= 1")
        if self.num_shards < 1:
            raise ValueError(f"num_shards ({self.num_shards}) must be >= 1")
        if self.prefetch < 1:
            raise ValueError(f"prefetch ({self.prefetch}) must be >= 1")

    @property
    def resolved_num_actors(self) -> int:
        return self.num_actors or max(1, (os.cpu_count() or 2) - 1)


# -- Ray wrappers: thin, one per role ------------------------------------------------------------


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1, max_concurrency=4)
class ShardActor:
    """A ReplayShard plus a thread that keeps ingesting from Redis."""

    def __init__(self, *args, snapshot: str | None = None, **kwargs):
        self.shard = ReplayShard(*args, **kwargs)
        if snapshot and pathlib.Path(snapshot).exists():
            self.shard.restore(pathlib.Path(snapshot))  # warm start (resume, or a Ray restart)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._ingest_loop, daemon=True)
        self._thread.start()

    def _ingest_loop(self) -> None:
        while not self._stop.is_set():
            try:
                with self._lock:
                    read = self.shard.ingest(max_chunks=8)
            except Exception as error:  # Redis hiccup: log, back off, go on
                logger.warning("shard ingest failed: %s", error)
                read = 0
            if read == 0:
                self._stop.wait(0.01)

    def sample(self, batch_size: int):
        with self._lock:
            return self.shard.sample(batch_size), self.shard.total_priority()

    def update_priorities(self, keys, td_abs) -> int:
        with self._lock:
            return self.shard.update_priorities(keys, td_abs)

    def stats(self) -> dict:
        with self._lock:
            return self.shard.stats()

    def snapshot(self, path: str) -> None:
        with self._lock:
            self.shard.snapshot(pathlib.Path(path))

    def pid(self) -> int:
        return os.getpid()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class RayReplayClient:
    """Keeps `prefetch` sample requests in flight, to shards chosen by their total priority."""

    def __init__(self, shards: list, prefetch: int, seed: int = 0):
        self.shards = shards
        self.prefetch = prefetch
        self.totals = np.ones(len(shards))
        self.rng = np.random.default_rng(seed)
        self.inflight: dict = {}  # ObjectRef → shard id

    def _request(self, batch_size: int) -> None:
        weights = self.totals / self.totals.sum() if self.totals.sum() > 0 else None
        shard_id = int(self.rng.choice(len(self.shards), p=weights))
        self.inflight[self.shards[shard_id].sample.remote(batch_size)] = shard_id

    def next_sample(self, batch_size: int):
        while len(self.inflight) < self.prefetch:
            self._request(batch_size)
        ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=1.0)
        if not ready:
            return None
        shard_id = self.inflight.pop(ready[0])
        try:
            sample, total = ray.get(ready[0])
        except ray.exceptions.RayError as error:  # shard restarting: Ray brings it back
            logger.warning("sample from shard %d failed: %s", shard_id, error)
            time.sleep(0.5)
            return None
        self.totals[shard_id] = max(total, 1e-9)
        if sample is None:
            time.sleep(0.01)  # the shard's rate limiter said no; ask again shortly
            return None
        return shard_id, sample

    def update_priorities(self, shard_id: int, keys, td_abs) -> None:
        self.shards[shard_id].update_priorities.remote(keys, td_abs)  # fire and forget


@ray.remote(num_cpus=0, max_concurrency=4)
class LearnerActor:
    def __init__(self, shards: list, prefetch: int, seed: int, *args, **kwargs):
        torch.manual_seed(seed)
        self.runner = LearnerRunner(*args, replay=RayReplayClient(shards, prefetch, seed), **kwargs)

    def run(self) -> dict:
        return self.runner.run()

    def stop(self) -> None:
        self.runner.stop()

    def state_dict(self) -> dict:
        return self.runner.state_dict()

    def updates(self) -> int:
        return self.runner.learner.updates


@ray.remote(num_cpus=1, max_restarts=-1, max_concurrency=2)
class ActorActor:
    def __init__(self, *args, **kwargs):
        self.runner = ActorRunner(*args, **kwargs)

    def run(self) -> dict:
        return self.runner.run()

    def stop(self) -> None:
        self.runner.stop()


# -- wiring ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Components:
    shards: list
    learner: object
    actors: list
    run_refs: list


def connect_components(
    config, redis_url: str, run_id: str, run_dir: pathlib.Path, learner_state: dict | None
) -> Components:
    """Starts shards, then the learner (it publishes weights first), then the actors."""
    distributed = config.distributed
    stack, num_actions = config.env.frame_stack, config.env.num_actions
    # Replay shards: consume the experience stream through one consumer group.
    shards = [
        ShardActor.options(name=f"mario-{run_id}-shard-{i}").remote(
            i, config.replay, redis_url, run_id, stack, num_actions, config.redis,
            seed=config.seed, snapshot=str(run_dir / f"replay-{i}.npz"),
        )
        for i in range(distributed.num_shards)
    ]  # fmt: skip
    # The learner: on the GPU when the cluster has one.
    use_gpu = ray.cluster_resources().get("GPU", 0) >= 1 and config.learner.device != "cpu"
    learner = LearnerActor.options(num_gpus=1 if use_gpu else 0).remote(
        shards,
        distributed.prefetch,
        config.seed,
        config.learner,
        config.network,
        num_actions,
        stack,
        LearnerRunnerConfig(publish_every_updates=config.publish_every_updates),
        redis_url,
        run_id,
        redis_config=config.redis,
        state=learner_state,
    )
    ray.get(learner.updates.remote())  # weights are published before any actor starts
    # Actors: one CPU each, restarted by Ray if they die.
    count = distributed.resolved_num_actors
    runner_config = ActorRunnerConfig(weights_poll_frames=distributed.weights_poll_frames)
    actors = [
        ActorActor.remote(
            i, count, config.env, config.actor, config.network, runner_config, redis_url,
            run_id, config.redis, seed=config.seed,
        )
        for i in range(count)
    ]  # fmt: skip
    run_refs = [learner.run.remote()] + [actor.run.remote() for actor in actors]
    return Components(shards, learner, actors, run_refs)


def read_counters(client, keys: RedisKeys) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in client.hgetall(keys.counters).items()}


def read_stats(client, keys: RedisKeys) -> dict[str, dict]:
    return {k.decode(): msgpack.unpackb(v) for k, v in client.hgetall(keys.stats).items()}


def train_distributed(config, console: Console | None = None) -> dict:
    """Runs the distributed trainer until its budget is spent or a stop signal arrives."""
    from common.train import TrainConfig, _prepare, _Stop

    console = console or Console()
    config, run_dir, payload = _prepare(config)
    assert isinstance(config, TrainConfig)
    run_dir.mkdir(parents=True, exist_ok=True)
    run_id = run_dir.name
    embedded = EmbeddedRedis() if config.redis_url is None else None
    redis_url = embedded.url if embedded else config.redis_url
    (run_dir / "redis_url").write_text(redis_url + "\n")
    client = connect(redis_url, config.redis)
    keys = RedisKeys(run_id)
    if payload is not None:  # the counters continue where the checkpoint left them
        saved = {k: v for k, v in payload["counters"].items() if isinstance(v, int)}
        if saved:
            client.hset(keys.counters, mapping=saved)
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(
            address=config.ray_address,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    metrics = MetricsLogger(
        run_dir, config_to_dict(config), config.wandb, resume=payload is not None
    )
    components = connect_components(
        config, redis_url, run_id, run_dir, payload["learner"] if payload else None
    )
    recent: collections.deque = collections.deque(maxlen=100)
    last_telemetry = "0-0"
    start = time.monotonic()
    deadline = start + config.minutes * 60 if config.minutes else float("inf")
    next_checkpoint = start + config.checkpoint_minutes * 60
    elapsed_before = float(payload["counters"].get("elapsed_s", 0.0)) if payload else 0.0
    counters: dict[str, int] = {}
    stats: dict[str, dict] = {}
    last_log = 0.0

    def checkpoint() -> None:
        state = ray.get(components.learner.state_dict.remote())
        ray.get([
            shard.snapshot.remote(str(run_dir / f"replay-{i}.npz"))
            for i, shard in enumerate(components.shards)
        ])  # fmt: skip
        save_checkpoint(run_dir, {
            "learner": state,
            "config": config_to_dict(config),
            "counters": {**read_counters(client, keys), "updates": state["updates"],
                         "elapsed_s": elapsed_before + time.monotonic() - start},
            "rng": {"torch": torch.get_rng_state()},
        })  # fmt: skip

    live = Live(console=console, auto_refresh=False) if config.live_display else None
    if live:
        live.start()
    with _Stop() as stop:
        try:
            while not stop.requested and time.monotonic() < deadline:
                time.sleep(0.5)
                counters = read_counters(client, keys)
                if counters.get("env_steps", 0) >= config.total_env_steps:
                    break
                _restart_dead_actors(components)
                response = client.xread({keys.telemetry: last_telemetry}, count=1000)
                for _, entries in response or []:
                    for entry_id, fields in entries:
                        last_telemetry = entry_id
                        record = msgpack.unpackb(fields[b"m"])
                        recent.append(record)
                        metrics.log(_episode_metrics(record), counters.get("env_steps", 0))
                now = time.monotonic()
                if now - last_log >= config.log_every_s or live:
                    stats = read_stats(client, keys)
                    stats["replay"] = _merge_shard_stats(
                        ray.get([s.stats.remote() for s in components.shards])
                    )
                    record = _system_metrics(client, keys, counters, stats)
                    if now - last_log >= config.log_every_s:
                        metrics.log(record, counters.get("env_steps", 0))
                        last_log = now
                    if live:
                        live.update(_table(config, counters, record, recent), refresh=True)
                if now >= next_checkpoint:
                    checkpoint()
                    next_checkpoint = now + config.checkpoint_minutes * 60
        finally:
            if live:
                live.stop()
            _shutdown(components)
            checkpoint()
            counters = read_counters(client, keys)
            metrics.close()
            for shard in components.shards:
                ray.kill(shard)
            ray.kill(components.learner)
            for actor in components.actors:
                ray.kill(actor)
            if started_ray:
                ray.shutdown()
            client.close()
            if embedded:
                embedded.stop()
    summary = {"run_dir": str(run_dir), **counters}
    console.print(f"checkpoint written to {run_dir}; {summary}")
    return summary


def _episode_metrics(record: dict) -> dict:
    """An actor's episode telemetry under the same names the serial trainer logs."""
    return {
        "episode/return": record["episode_return"],
        "episode/length": record["length"],
        "episode/x_pos": record["max_x_pos"],
        "episode/flag_get": int(record["flag_get"]),
        "episode/level": record["level"],
        "episode/epsilon": record["epsilon"],
        "episode/policy_version": record["policy_version"],
        "episode/actor": record["actor"],
    }


def _restart_dead_actors(components: Components) -> None:
    """Role loops end only on stop(). A dead actor is restarted by Ray on its next call, so
    its loop is started again (its env state is lost, nothing else); the learner's death is
    fatal and raises here."""
    for index, ref in enumerate(components.run_refs):
        if not _finished(ref):
            continue
        if index == 0:
            ray.get(ref)  # the learner: re-raise its error
            raise RuntimeError("the learner loop ended without being stopped")
        try:
            ray.get(ref)
            logger.warning("actor %d loop ended without being stopped; restarting it", index - 1)
        except ray.exceptions.RayError as error:
            logger.warning("actor %d died (%s); Ray restarts it", index - 1, error)
        components.run_refs[index] = components.actors[index - 1].run.remote()


def _finished(ref) -> bool:
    ready, _ = ray.wait([ref], timeout=0)
    return bool(ready)


def _shutdown(components: Components) -> None:
    """Actors first (they flush their last chunks), then the learner, then ingest threads."""
    for actor in components.actors:
        actor.stop.remote()
    ray.wait(components.run_refs[1:], num_returns=len(components.run_refs) - 1, timeout=60)
    components.learner.stop.remote()
    ray.wait(components.run_refs[:1], timeout=60)
    # Let the shards ingest what the actors flushed, then stop their threads.
    time.sleep(1.0)
    ray.get([shard.stop.remote() for shard in components.shards], timeout=60)


def _merge_shard_stats(per_shard: list[dict]) -> dict:
    merged: dict = {}
    for stats in per_shard:
        for key, value in stats.items():
            merged[key] = merged.get(key, 0) + value
    if per_shard:
        merged["replay/beta"] = per_shard[0].get("replay/beta", 0)
        inserted = max(merged.get("replay/inserted", 0), 1)
        merged["replay/sample_to_insert_ratio"] = merged.get("replay/sampled", 0) / inserted
    return merged


def _system_metrics(client, keys: RedisKeys, counters: dict, stats: dict) -> dict:
    record: dict = {f"counters/{k}": v for k, v in counters.items()}
    learner = stats.get("learner", {})
    record.update({k: v for k, v in learner.items() if isinstance(v, int | float)})
    record.update(stats.get("replay", {}))
    actor_stats = {name: s for name, s in stats.items() if name.startswith("actor-")}
    record["actors/env_steps_per_s"] = sum(s["env_steps_per_s"] for s in actor_stats.values())
    record["actors/frames_per_s"] = sum(s["frames_per_s"] for s in actor_stats.values())
    for name, s in actor_stats.items():
        record[f"actors/{name}/frames_per_s"] = s["frames_per_s"]
    version = int(client.get(keys.weights_version) or 0)
    if actor_stats:
        record["policy_lag"] = version - min(s["policy_version"] for s in actor_stats.values())
    record["stream_lag_chunks"] = client.xlen(keys.experience)
    record["wall_time"] = time.time()
    return record


def _table(config, counters: dict, record: dict, recent) -> Table:
    table = Table(title=f"mario train  level {config.env.level}", show_header=False)
    x_positions = [r.get("max_x_pos", 0) for r in recent]
    rows = [
        ("env steps", f"{counters.get('env_steps', 0):,} / {config.total_env_steps:,}"),
        ("env frames/s", f"{record.get('actors/frames_per_s', 0):,.0f}"),
        ("updates", f"{record.get('learner/updates', 0):,} "
                    f"({record.get('learner/updates_per_s', 0):.1f}/s)"),
        ("replay size", f"{record.get('replay/size', 0):,}"),
        ("stream lag (chunks)", f"{record.get('stream_lag_chunks', 0)}"),
        ("policy lag (updates)", f"{record.get('policy_lag', 0)}"),
        ("mean x_pos (last 100)", f"{np.mean(x_positions) if x_positions else 0:.0f}"),
        ("flags (last 100)", f"{sum(bool(r.get('flag_get')) for r in recent)}"),
        ("time", datetime.datetime.now().strftime("%H:%M:%S")),
    ]  # fmt: skip
    for key, value in rows:
        table.add_row(key, value)
    return table
