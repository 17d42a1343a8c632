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
import socket
import subprocess
import sys
import threading
import time

import msgpack
import numpy as np
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
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
    """Actor processes at the start (1 CPU each); None: one per CPU the cluster has free once the
    learner holds its CPU, at least 1."""
    max_actors: int | None = None
    """Elastic actors: when CPUs join the cluster during the run, start actors on them up to this
    many in all. None: --distributed.num-actors when that is given (a fixed pool), else no cap."""
    num_shards: int = 1
    """Replay shards."""
    prefetch: int = 4
    """Sample requests the learner keeps in flight."""
    weights_poll_frames: int = 400
    """Emulator frames between an actor's checks of the weights version."""

    def __post_init__(self) -> None:
        if self.num_actors is not None and self.num_actors < 1:
            raise ValueError(f"num_actors ({self.num_actors}) must be >= 1")
        if self.max_actors is not None and self.max_actors < max(1, self.num_actors or 1):
            raise ValueError(
                f"max_actors ({self.max_actors}) must be >= 1 and >= num_actors ({self.num_actors})"
            )
        if self.num_shards < 1:
            raise ValueError(f"num_shards ({self.num_shards}) must be >= 1")
        if self.prefetch < 1:
            raise ValueError(f"prefetch ({self.prefetch}) must be >= 1")

    @property
    def resolved_num_actors(self) -> int:
        """The initial count on this machine alone (a local Ray: every CPU but the learner's)."""
        return self.num_actors or max(1, (os.cpu_count() or 2) - 1)

    @property
    def resolved_max_actors(self) -> int | None:
        return self.max_actors if self.max_actors is not None else self.num_actors


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


@ray.remote(num_cpus=1, max_concurrency=4)
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


@ray.remote(num_cpus=1, max_restarts=-1, max_concurrency=3)
class ActorActor:
    def __init__(self, *args, **kwargs):
        self.runner = ActorRunner(*args, **kwargs)

    def run(self) -> dict:
        return self.runner.run()

    def stop(self) -> None:
        self.runner.stop()

    def node(self) -> tuple[str, str]:
        """(Ray node id, IP) of the node this actor runs on."""
        context = ray.get_runtime_context()
        return context.get_node_id(), ray.util.get_node_ip_address()


# -- wiring ----------------------------------------------------------------------------------


def free_cpus() -> int:
    """Whole CPUs free in the Ray cluster now."""
    return int(ray.available_resources().get("CPU", 0))


@dataclasses.dataclass
class _Slot:
    handle: object
    run_ref: object
    node_ref: object
    node: tuple[str, str] | None = None  # (node id, IP) once placed


class ActorPool:
    """The actor processes, elastic. Starts `initial`; later starts one on every CPU that is free
    in the cluster (a node joined), up to `maximum` in all (None: no cap); restarts an actor's
    loop after a crash (Ray restarts the process); drops, with a log line, the actors of a node
    that left the cluster, and the run goes on with the others."""

    def __init__(self, make_actor, initial: int, maximum: int | None, grow_every_s: float = 2.0):
        self._make = make_actor  # (index, actor count, ε band) → Ray actor handle
        self.initial = initial
        self.maximum = maximum
        self.grow_every_s = grow_every_s
        self.slots: dict[int, _Slot] = {}
        self.started = 0
        self.lost = 0
        self._next_grow = time.monotonic() + grow_every_s
        for _ in range(initial):
            self._start()

    def _start(self) -> None:
        index = self.started
        self.started += 1
        # ε: Ape-X's spread over the initial actors; an actor started later takes the band of
        # initial actor index mod initial, so the mix of exploration stays what it was.
        handle = self._make(index, self.initial, index % self.initial)
        self.slots[index] = _Slot(handle, handle.run.remote(), handle.node.remote())

    @property
    def handles(self) -> list:
        return [slot.handle for slot in self.slots.values()]

    @property
    def run_refs(self) -> list:
        return [slot.run_ref for slot in self.slots.values()]

    def tick(self) -> None:
        self._placed()
        self._reap()
        if time.monotonic() >= self._next_grow:
            self._next_grow = time.monotonic() + self.grow_every_s
            self._grow()

    def _placed(self) -> None:
        for index, slot in self.slots.items():
            if slot.node is not None or not _finished(slot.node_ref):
                continue
            try:
                slot.node = tuple(ray.get(slot.node_ref))
            except ray.exceptions.RayError:  # died before it answered; ask again after restart
                slot.node_ref = slot.handle.node.remote()
                continue
            logger.info("actor %d runs on node %s (%s)", index, slot.node[1], slot.node[0][:12])

    def _reap(self) -> None:
        alive = None
        for index, slot in list(self.slots.items()):
            if not _finished(slot.run_ref):
                continue
            try:
                ray.get(slot.run_ref)
                logger.warning("actor %d loop ended without being stopped; restarting it", index)
            except ray.exceptions.RayError as error:
                if alive is None:
                    alive = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
                if slot.node is not None and slot.node[0] not in alive:
                    ray.kill(slot.handle, no_restart=True)
                    del self.slots[index]
                    self.lost += 1
                    logger.warning(
                        "actor %d lost: its node %s left the cluster; %d actors go on",
                        index, slot.node[1], len(self.slots),
                    )  # fmt: skip
                    continue
                logger.warning("actor %d died (%s); Ray restarts it", index, error)
                slot.node, slot.node_ref = None, slot.handle.node.remote()
            slot.run_ref = slot.handle.run.remote()

    def _grow(self) -> None:
        if self.maximum is not None and len(self.slots) >= self.maximum:
            return
        if any(slot.node is None for slot in self.slots.values()):
            return  # the resource view catches up once every actor is placed
        free = free_cpus()
        room = free if self.maximum is None else min(free, self.maximum - len(self.slots))
        for _ in range(room):
            self._start()
        if room > 0:
            logger.info("%d free CPUs: started %d actors (%d in all)", free, room, len(self.slots))

    def stop(self, timeout: float = 60) -> None:
        for handle in self.handles:
            handle.stop.remote()
        refs = self.run_refs
        ray.wait(refs, num_returns=len(refs), timeout=timeout)

    def kill(self) -> None:
        for handle in self.handles:
            ray.kill(handle, no_restart=True)


@dataclasses.dataclass
class Components:
    shards: list
    learner: object
    learner_ref: object
    actors: ActorPool


def connect_components(
    config, redis_url: str, run_id: str, run_dir: pathlib.Path, learner_state: dict | None
) -> Components:
    """Starts shards, then the learner (it publishes weights first), then the actors."""
    distributed = config.distributed
    stack, num_actions = config.env.frame_stack, config.env.num_actions
    # Shards write their snapshots into the run directory: keep them on this (the driver's) node.
    here = ray.get_runtime_context().get_node_id()
    on_this_node = NodeAffinitySchedulingStrategy(here, soft=False)
    shards = [
        ShardActor.options(
            name=f"mario-{run_id}-shard-{i}", scheduling_strategy=on_this_node
        ).remote(
            i, config.replay, redis_url, run_id, stack, num_actions, config.redis,
            seed=config.seed, snapshot=str(run_dir / f"replay-{i}.npz"),
        )
        for i in range(distributed.num_shards)
    ]  # fmt: skip
    # The learner: on a GPU when the cluster has one, else on this node; it holds one CPU.
    cpus_before_learner = free_cpus()
    use_gpu = ray.cluster_resources().get("GPU", 0) >= 1 and config.learner.device != "cpu"
    learner = LearnerActor.options(
        num_gpus=1 if use_gpu else 0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True),
    ).remote(
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
    # Actors: one CPU each, restarted by Ray if they die, more as CPUs join.
    maximum = distributed.resolved_max_actors
    initial = distributed.num_actors or max(1, cpus_before_learner - 1)
    initial = min(initial, maximum) if maximum is not None else initial
    runner_config = ActorRunnerConfig(weights_poll_frames=distributed.weights_poll_frames)

    def make_actor(index: int, count: int, band: int):
        return ActorActor.remote(
            index, count, config.env, config.actor, config.network, runner_config, redis_url,
            run_id, config.redis, seed=config.seed, epsilon_actor=band,
        )  # fmt: skip

    actors = ActorPool(make_actor, initial, maximum)
    logger.info("started %d actors (max %s)", initial, maximum or "no cap")
    return Components(shards, learner, learner.run.remote(), actors)


def read_counters(client, keys: RedisKeys) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in client.hgetall(keys.counters).items()}


def read_stats(client, keys: RedisKeys) -> dict[str, dict]:
    return {k.decode(): msgpack.unpackb(v) for k, v in client.hgetall(keys.stats).items()}


class RayHead:
    """`ray start --head --block` as a child process: a Ray head node that other machines join
    with `ray start --address HOST:PORT` (the docker-compose trainer). stop() ends its node."""

    def __init__(self, port: int, cpus: int | None, dashboard_port: int, run_dir: pathlib.Path):
        ray_cli = pathlib.Path(sys.executable).with_name("ray")
        command = [
            str(ray_cli) if ray_cli.exists() else "ray", "start", "--head", f"--port={port}",
            "--dashboard-host=0.0.0.0", f"--dashboard-port={dashboard_port}",
            "--disable-usage-stats", "--block",
            *([f"--num-cpus={cpus}"] if cpus is not None else []),
        ]  # fmt: skip
        for name, number in (("ray_head_port", port), ("ray_dashboard_port", dashboard_port)):
            _check_port_free(name, number)
        self.log_path = run_dir / "ray-head.log"
        self.address = f"{ray.util.get_node_ip_address()}:{port}"
        # Ray's token authentication, on unless RAY_AUTH_MODE says otherwise: the token is
        # $RAY_AUTH_TOKEN or ~/.ray/auth_token (made here if missing); joining nodes need it too.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        if os.environ["RAY_AUTH_MODE"] == "token" and not os.environ.get("RAY_AUTH_TOKEN"):
            subprocess.run([command[0], "get-auth-token", "--generate"], check=True,
                           stdout=subprocess.DEVNULL)  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while b"Ray runtime started" not in self.log_path.read_bytes():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise ConnectionError(f"ray start --head --port={port} failed:\n{tail}")
            time.sleep(0.5)
        logger.info("Ray head at %s (dashboard port %d)", self.address, dashboard_port)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # `ray start --block` ends its node's processes on SIGTERM
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _check_port_free(name: str, port: int) -> None:
    with socket.socket() as probe:
        # As gRPC binds: a port held only by closed connections (TIME_WAIT) is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError as error:
            raise ConnectionError(
                f"{name} {port} is not free on this machine ({error.strerror}): pick another"
            ) from None


def _warn_if_redis_unreachable(redis_url: str) -> None:
    """A loopback Redis serves only this machine's nodes."""
    ips = {node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"]}
    if len(ips) > 1 and ("127.0.0.1" in redis_url or "localhost" in redis_url):
        logger.warning(
            "Redis %s is on loopback but the cluster spans %d machines: actors elsewhere cannot "
            "reach it; pass --redis-url with an address every node can reach",
            redis_url,
            len(ips),
        )


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
    head = None

    def release() -> None:
        """Ends what this function started: Ray (and its head node), the Redis connection."""
        if started_ray:
            ray.shutdown()
        if head:
            head.stop()
        client.close()
        if embedded:
            embedded.stop()

    try:
        if started_ray:
            if config.ray_head_port is not None:
                head = RayHead(
                    config.ray_head_port, config.ray_head_cpus, config.ray_dashboard_port, run_dir
                )
            # "local": a private Ray even where `ray start` left its address in /tmp/ray.
            address = head.address if head else config.ray_address or os.getenv("RAY_ADDRESS")
            address = address or "local"
            # A private local Ray gets CPUs for the learner and every requested actor.
            wanted = 1 + (config.distributed.num_actors or 1)
            ray.init(
                address=address,
                num_cpus=max(os.cpu_count() or 1, wanted) if address == "local" else None,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
            _warn_if_redis_unreachable(redis_url)
        metrics = MetricsLogger(
            run_dir, config_to_dict(config), config.wandb, resume=payload is not None
        )
        components = connect_components(
            config, redis_url, run_id, run_dir, payload["learner"] if payload else None
        )
    except BaseException:  # a failed start leaves no Ray node or Redis behind
        release()
        raise
    recent: collections.deque = collections.deque(maxlen=100)
    last_telemetry = "0-0"
    start = time.monotonic()
    deadline = start + config.minutes * 60 if config.minutes else float("inf")
    next_checkpoint = start + config.checkpoint_minutes * 60
    elapsed_before = float(payload["counters"].get("elapsed_s", 0.0)) if payload else 0.0
    counters: dict[str, int] = {}
    stats: dict[str, dict] = {}
    last_log = 0.0

    def checkpoint() -> dict:
        """Writes the checkpoint; returns the counters it holds."""
        state = ray.get(components.learner.state_dict.remote())
        ray.get([
            shard.snapshot.remote(str(run_dir / f"replay-{i}.npz"))
            for i, shard in enumerate(components.shards)
        ])  # fmt: skip
        saved = {**read_counters(client, keys), "updates": state["updates"],
                 "elapsed_s": round(elapsed_before + time.monotonic() - start, 1)}  # fmt: skip
        save_checkpoint(run_dir, {
            "learner": state,
            "config": config_to_dict(config),
            "counters": saved,
            "rng": {"torch": torch.get_rng_state()},
        })  # fmt: skip
        return saved

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
                _check_learner(components)
                components.actors.tick()
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
                    record["actors/running"] = len(components.actors.slots)
                    record["actors/lost"] = components.actors.lost
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
            counters = checkpoint()
            metrics.close()
            for shard in components.shards:
                ray.kill(shard)
            ray.kill(components.learner)
            components.actors.kill()
            release()
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


def _check_learner(components: Components) -> None:
    """The learner's loop ends only on stop(): its death is fatal and raises here."""
    if _finished(components.learner_ref):
        ray.get(components.learner_ref)  # re-raises the learner's error
        raise RuntimeError("the learner loop ended without being stopped")


def _finished(ref) -> bool:
    ready, _ = ray.wait([ref], timeout=0)
    return bool(ready)


def _shutdown(components: Components) -> None:
    """Actors first (they flush their last chunks), then the learner, then ingest threads."""
    components.actors.stop(timeout=60)
    components.learner.stop.remote()
    ray.wait([components.learner_ref], timeout=60)
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
