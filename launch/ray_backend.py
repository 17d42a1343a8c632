"""The Ray backend of `mario train`: every role in its own Ray process, meeting in Redis.

All process wiring is here, in one place. Redis carries experience (actors → shards), weights
(learner → actors), counters, stats and episode telemetry; Ray places and restarts the
processes and carries sample batches (shards → learner) through its object store. Each Ray
actor below builds its role from a spec (launch/roles.py; the evaluator from the run's config)
and adds what running it in a process of its own needs (the shard: an ingest thread, a lock,
the snapshot a restarted shard restores, a drain on stop; the evaluator: the weights, read from
Redis); the role classes know nothing of Ray.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import numpy as np
import ray
import redis
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from common.redis_io import EmbeddedRedis, RedisEndpoint
from common.wire import WireError, decode_record, decode_weights
from launch.config import TrainConfig
from launch.errors import RoleFailed
from launch.evaluate import evaluate_round
from launch.roles import (
    ActorSpec,
    LearnerSpec,
    ReplaySpec,
    RoleSpecs,
    build_actor_runner,
    build_evaluator,
    build_learner_runner,
    build_shard,
)
from launch.trainer import (
    BACKEND_COUNTERS,
    episode_record,
    newest_snapshot,
    quietly,
    replay_snapshot_path,
)
from learner.checkpoint import SET_DIR_KEY
from replay_server.replay import SnapshotError, write_snapshot

logger = logging.getLogger("ray_backend")
KEEP_LEARNER_STATE_S = 60.0  # at most this much learning is lost when the learner dies
MAX_LEARNER_RESTARTS = 10
ACTOR_STATS = ("env_steps_per_s", "frames_per_s", "policy_version")  # what the driver reads
DRIVER_LEASE_S = 30  # a run's hold on its run id in Redis, renewed every DRIVER_LEASE_S / 6
# Sets KEYS[1] to ARGV[1] for ARGV[2] seconds unless another value holds it; returns that value.
_CLAIM_SCRIPT = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return holder end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return false
"""
_RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""


# -- Ray wrappers, one per role --------------------------------------------------------------------


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1, max_concurrency=4)
class ShardWorker:
    """A ReplayShard plus a thread that keeps ingesting from Redis."""

    def __init__(self, spec: ReplaySpec, endpoint: RedisEndpoint, snapshot: str, run_dir: str):
        """`snapshot`: the snapshot of the set the run resumed from; a shard that Ray restarts
        takes the newest whole set's instead. Either way the loss since a snapshot is counted."""
        self.shard = build_shard(spec, endpoint)
        if not ray.get_runtime_context().was_current_actor_reconstructed:
            path = pathlib.Path(snapshot)
            self.shard.restore(path if path.exists() else None)
        else:
            for attempt in range(3):  # a checkpoint may rotate the set while this one loads it
                path = newest_snapshot(pathlib.Path(run_dir), spec.shard_id)
                try:
                    self.shard.restore(path)
                    break
                except SnapshotError as error:  # e.g. rotated away between finding and reading
                    logger.warning("shard %d, attempt %d: %s", spec.shard_id, attempt + 1, error)
            else:
                self.shard.restore(None)  # starts empty: the loss is counted
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

    def sample(self, batch_size: int, count: int = 1):
        """(up to `count` batches, as many as the rate limiter allows now: maybe none; the
        shard's total priority)."""
        with self._lock:
            batches = []
            while len(batches) < count:
                sample = self.shard.sample(batch_size)
                if sample is None:
                    break
                batches.append(sample)
            return batches, self.shard.total_priority()

    def update_priorities(self, keys, td_abs) -> int:
        """New priorities of the sampled `keys` (several batches' concatenated: one call)."""
        with self._lock:
            return self.shard.update_priorities(keys, td_abs)

    def stats(self) -> dict:
        with self._lock:
            return self.shard.stats()

    def snapshot(self, path: str) -> tuple[float, float]:
        """Writes the replay's snapshot: a copy taken under the lock, written outside it.
        Returns (seconds sampling and ingest waited, seconds in all)."""
        start = time.monotonic()
        with self._lock:
            arrays = self.shard.replay.snapshot_arrays()
        locked = time.monotonic() - start
        write_snapshot(pathlib.Path(path), arrays)
        return locked, time.monotonic() - start

    def pid(self) -> int:
        return os.getpid()

    def stop(self, drain_s: float = 30.0) -> int:
        """Stops ingest after taking in what the stopped actors left in the stream (the learner
        has stopped: the rate limiter no longer holds it back), so the replay's snapshot holds
        it; an embedded Redis starts empty on resume. Returns the chunks taken in."""
        self._stop.set()
        self._thread.join()
        drained, deadline = 0, time.monotonic() + drain_s
        with contextlib.suppress(redis.RedisError), self._lock:
            for _ in range(2):  # again if the last trim found entries delivered but never read
                while time.monotonic() < deadline:
                    read = self.shard.ingest(max_chunks=64, limit=False)
                    if read == 0:
                        break
                    drained += read
                self.shard.finish()  # acks (an outage's too, if Redis answers now), a trim
                if not self.shard.rereading:
                    break
        return drained


@ray.remote(num_cpus=1, max_concurrency=4)
class LearnerWorker:
    """The LearnerRunner, fed by a RayReplayClient over the shards."""

    def __init__(
        self, spec: LearnerSpec, endpoint: RedisEndpoint, shards: list, *, prefetch: int,
        batches_per_request: int, state: dict | None, updates_floor: int = 0,
    ):  # fmt: skip
        replay = RayReplayClient(shards, prefetch, spec.seed, batches_per_request)
        self.runner = build_learner_runner(spec, endpoint, replay, state, updates_floor)

    def run(self) -> dict:
        return self.runner.run()

    def stop(self) -> None:
        self.runner.stop()

    def state_dict(self) -> dict:
        return self.runner.state_dict()

    def updates(self) -> int:
        return self.runner.learner.updates


@ray.remote(num_cpus=1, max_restarts=-1, max_concurrency=3)
class ActorWorker:
    """An ActorRunner: one CPU, restarted by Ray if its process dies."""

    def __init__(self, spec: ActorSpec, endpoint: RedisEndpoint):
        self.runner = build_actor_runner(spec, endpoint)

    def run(self) -> dict:
        return self.runner.run()

    def stop(self) -> None:
        self.runner.stop()

    def node(self) -> tuple[str, str]:
        """(Ray node id, IP) of the node this actor runs on."""
        context = ray.get_runtime_context()
        return context.get_node_id(), ray.util.get_node_ip_address()


def shard_weights(totals: np.ndarray) -> np.ndarray:
    """How often each shard is asked for a batch: in proportion to its total priority (so a
    transition's chance is the same whichever shard holds it); a shard that last reported an
    empty replay (a restart without a snapshot, the run's start) is asked as often as the
    average shard with data, so that it is heard from again once it has some."""
    totals = np.asarray(totals, dtype=np.float64)
    positive = totals > 0
    if not positive.any():
        return np.full(len(totals), 1 / len(totals))
    weights = np.where(positive, totals, totals[positive].mean())
    return weights / weights.sum()


class RayReplayClient:
    """Keeps `prefetch` sample requests in flight, to shards chosen by their total priority;
    each asks for `batches_per_request` batches, and the priorities of that many batches go
    back to a shard in one call (a Ray call's cost hardly depends on what it carries)."""

    def __init__(self, shards: list, prefetch: int, seed: int = 0, batches_per_request: int = 1):
        self.shards = shards
        self.prefetch = prefetch
        self.batches_per_request = batches_per_request
        self.totals = np.ones(len(shards))
        self.rng = np.random.default_rng(seed)
        self.inflight: dict = {}  # ObjectRef → shard id
        self.ready: collections.deque = collections.deque()  # (shard id, batch) received
        self.priorities: dict[int, list] = {}  # shard id → [(keys, |TD|)] not yet sent

    def _request(self, batch_size: int) -> None:
        shard_id = int(self.rng.choice(len(self.shards), p=shard_weights(self.totals)))
        ref = self.shards[shard_id].sample.remote(batch_size, self.batches_per_request)
        self.inflight[ref] = shard_id

    def next_sample(self, batch_size: int):
        if self.ready:
            return self.ready.popleft()
        while len(self.inflight) < self.prefetch:
            self._request(batch_size)
        ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=1.0)
        if not ready:
            return None
        shard_id = self.inflight.pop(ready[0])
        try:
            batches, total = ray.get(ready[0])
        except ray.exceptions.RayError as error:  # shard restarting: Ray brings it back
            logger.warning("sample from shard %d failed: %s", shard_id, error)
            time.sleep(0.5)
            return None
        self.totals[shard_id] = total
        if not batches:
            time.sleep(0.01)  # the shard's rate limiter said no; ask again shortly
            return None
        self.ready.extend((shard_id, batch) for batch in batches)
        return self.ready.popleft()

    def update_priorities(self, shard_id: int, keys, td_abs) -> None:
        """Sent (fire and forget) once `batches_per_request` batches of the shard have them. A
        copy of the keys is held: a view would hold the whole request's object in Ray's store.
        (Sent after the shard restarted from an older snapshot, they may reach transitions that
        reuse those keys: as a prefetched batch's always could.)"""
        pending = self.priorities.setdefault(shard_id, [])
        pending.append((np.array(keys), np.asarray(td_abs)))
        if len(pending) >= self.batches_per_request:
            self._send(shard_id)

    def _send(self, shard_id: int) -> None:
        pending = self.priorities.get(shard_id)
        if pending:
            keys = np.concatenate([k for k, _ in pending])
            td_abs = np.concatenate([t for _, t in pending])
            self.shards[shard_id].update_priorities.remote(keys, td_abs)
            pending.clear()

    def flush(self) -> None:
        """Sends every shard the priorities held back (the learner stops)."""
        for shard_id in self.priorities:
            self._send(shard_id)


@ray.remote(num_cpus=0, max_restarts=-1)
class EvalWorker:
    """Evaluates the weights the learner last published, while training goes on. It holds no
    Ray CPU: it works a few seconds every --eval.every-env-steps."""

    def __init__(self, config: TrainConfig, endpoint: RedisEndpoint):
        torch.set_num_threads(1)
        self.evaluator = build_evaluator(config)
        self.client = endpoint.connect()
        self.redis_keys = endpoint.keys
        self.averaged = config.learner.averaged  # play the average of the weights
        self.compare = config.eval.compare_online

    def evaluate(self, seeds: list[int], best_rank, video_path: str) -> dict:
        expected = self.evaluator.network.state_dict()
        weights, version, online = weights_to_evaluate(
            self.client, self.redis_keys, expected, self.averaged, self.compare
        )
        path = pathlib.Path(video_path)
        result = evaluate_round(self.evaluator, weights, seeds, best_rank, path, online)
        return {**result, "policy_version": version, "weights": weights}


def weights_to_evaluate(
    client: redis.Redis, keys, expected: dict, averaged: bool, compare: bool
) -> tuple[dict, int, dict | None]:
    """(weights, their version, the online net's weights or None) that a round plays, as the
    learner last published them: the average of the weights if it keeps one (`averaged`), and
    then, with `compare`, the online net's too (up to learner.runner.AVERAGE_PUBLISH_EVERY
    publishes newer); else the online net's.

    Raises:
        WireError: a blob is missing or malformed (the round fails and is skipped).
    """
    if not averaged:
        weights, version = decode_weights(client.get(keys.weights), expected)
        return weights, version, None
    pipe = client.pipeline(transaction=True)
    pipe.get(keys.ema_weights)
    pipe.get(keys.weights)
    average_blob, online_blob = pipe.execute()
    weights, version = decode_weights(average_blob, expected)
    online = decode_weights(online_blob, expected)[0] if compare else None
    return weights, version, online


# -- the actor pool ------------------------------------------------------------------------------


def free_cpus() -> int:
    """Whole CPUs free in the Ray cluster now."""
    return int(ray.available_resources().get("CPU", 0))


@dataclasses.dataclass
class _PoolMember:
    """One actor of the pool: its handle, its running loop, where it runs."""

    handle: object
    run_ref: object
    node_ref: object
    node: tuple[str, str] | None = None  # (node id, IP) once placed


def wait_keeping_redis(refs: list, timeout_s: float, embedded: EmbeddedRedis | None) -> list:
    """ray.wait for all of `refs`, up to `timeout_s`; returns those not ready. Meanwhile an
    embedded redis-server that ended is started again: the roles being stopped need it (their
    last chunks, the shards' drain and acks), and a `ray job stop` can end it together with the
    driver (seen: the stop then hung on the roles' Redis retries, holding the shards' locks)."""
    deadline, pending = time.monotonic() + timeout_s, list(refs)
    while pending:
        if embedded is not None:
            embedded.restart_if_dead()
        left = deadline - time.monotonic()
        if left <= 0:
            break
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=min(left, 1.0))
    return pending


class ActorPool:
    """The actor processes, elastic. Starts `initial`; later starts one on every CPU that is free
    in the cluster (a node joined), up to `maximum` in all (None: no cap); restarts an actor's
    loop after its process died (Ray restarts the process); drops, with a log line, the actors
    of a node that left the cluster, and the run goes on with the others. An error of an
    actor's own code ends the run with that error (RoleFailed), as the learner's does."""

    def __init__(self, make_actor, initial: int, maximum: int | None, grow_every_s: float = 2.0):
        self._make = make_actor  # (actor id, ε band, ε bands) → Ray actor handle
        self.initial = initial
        self.maximum = maximum
        self.grow_every_s = grow_every_s
        self.members: dict[int, _PoolMember] = {}
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
        handle = self._make(index, index % self.initial, self.initial)
        self.members[index] = _PoolMember(handle, handle.run.remote(), handle.node.remote())

    def tick(self) -> None:
        self._placed()
        self._reap()
        if time.monotonic() >= self._next_grow:
            self._next_grow = time.monotonic() + self.grow_every_s
            self._grow()

    def _placed(self) -> None:
        for index, member in self.members.items():
            if member.node is not None or not _finished(member.node_ref):
                continue
            try:
                member.node = tuple(ray.get(member.node_ref))
            except ray.exceptions.RayError:  # died before it answered; ask again after restart
                member.node_ref = member.handle.node.remote()
                continue
            logger.info("actor %d runs on node %s (%s)", index, member.node[1], member.node[0][:12])

    def _reap(self) -> None:
        alive = None
        for index, member in list(self.members.items()):
            if not _finished(member.run_ref):
                continue
            try:
                ray.get(member.run_ref)
                logger.warning("actor %d loop ended without being stopped; restarting it", index)
            except ray.exceptions.RayError as error:
                own = isinstance(error, ray.exceptions.RayTaskError) or getattr(
                    error, "actor_init_failed", False
                )
                if own:  # its code failed (running or starting): a restart would fail again
                    logger.error("actor %d failed:\n%s", index, error)  # with its traceback
                    cause = getattr(error, "cause", None) or error
                    raise RoleFailed.of(f"actor {index}", cause) from error
                if alive is None:
                    alive = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
                if member.node is not None and member.node[0] not in alive:
                    ray.kill(member.handle, no_restart=True)
                    del self.members[index]
                    self.lost += 1
                    logger.warning(
                        "actor %d lost: its node %s left the cluster; %d actors go on",
                        index, member.node[1], len(self.members),
                    )  # fmt: skip
                    continue
                logger.warning("actor %d died (%s); Ray restarts it", index, error)
                member.node, member.node_ref = None, member.handle.node.remote()
            member.run_ref = member.handle.run.remote()

    def _grow(self) -> None:
        if self.maximum is not None and len(self.members) >= self.maximum:
            return
        if any(member.node is None for member in self.members.values()):
            return  # the resource view catches up once every actor is placed
        free = free_cpus()
        room = free if self.maximum is None else min(free, self.maximum - len(self.members))
        for _ in range(room):
            self._start()
        if room > 0:
            logger.info(
                "%d free CPUs: started %d actors (%d in all)", free, room, len(self.members)
            )

    def stop(self, timeout: float = 60, embedded: EmbeddedRedis | None = None) -> None:
        for member in self.members.values():
            member.handle.stop.remote()
        wait_keeping_redis([member.run_ref for member in self.members.values()], timeout, embedded)

    def kill(self) -> None:
        for member in self.members.values():
            ray.kill(member.handle, no_restart=True)


# -- the backend ---------------------------------------------------------------------------------


class RayBackend:
    """Starts Redis (unless given) and Ray (unless joined), then the shards, the learner (it
    publishes weights first) and the actors; reads counters, stats and episodes from Redis."""

    name = "ray"

    def __init__(self, config: TrainConfig, run_dir: pathlib.Path, new_run: bool = True):
        """`new_run`: a run's first start (a branch's too), which owns nothing Redis holds
        under its name yet; False when resuming, where the stream's backlog is the run's."""
        self.config = config
        self.run_dir = run_dir
        self.new_run = new_run
        self.specs = RoleSpecs(config)
        self.shards: list = []
        self.learner = None
        self.learner_run = None
        self.actors: ActorPool | None = None
        self._last_telemetry = "0-0"
        self.evaluator = None
        self._eval_ref = None
        self.malformed_records = 0
        self._bad: dict[str, bytes] = {}  # what → the value of it last dropped
        self.learner_restarts = 0
        self._kept = KeptState(None)
        self.embedded: EmbeddedRedis | None = None
        self._counters: dict[str, int] = {}
        self._stats: dict[str, float] = {}
        self._redis_warned_at = -1e9

    # -- start: every resource is registered on `resources` as soon as it exists ---------------

    def start(self, resources: contextlib.ExitStack, checkpoint: dict | None) -> None:
        config = self.config
        if config.redis_url is None:
            embedded = EmbeddedRedis(data_dir=self.run_dir / "redis")
            resources.callback(quietly, "stopping the embedded redis-server", embedded.stop)
            self.embedded, url = embedded, embedded.url
        else:
            url = config.redis_url
        (self.run_dir / "redis_url").write_text(url + "\n")
        self.endpoint = RedisEndpoint(url, self.run_dir.name, config.redis)
        # The driver's own client fails fast: during an outage the driver goes on with what it
        # last read (and restarts an embedded server), rather than wait inside a command.
        self.client = self.endpoint.connect(outage_s=0)
        resources.callback(quietly, "closing the Redis client", self.client.close)
        try:
            self.client.ping()
        except redis.RedisError as error:  # unreachable, refused password, not Redis
            raise ValueError(
                f"redis_url {_without_password(url)}: cannot use this Redis "
                f"({type(error).__name__}: {error})"
            ) from None
        self.redis_keys = self.endpoint.keys
        self._claim_run_id(resources, url)
        self._counters = dict.fromkeys(BACKEND_COUNTERS, 0)
        if checkpoint is not None:  # the counters continue where the checkpoint left them
            saved = {k: v for k, v in checkpoint["counters"].items() if isinstance(v, int)}
            self.client.hset(self.redis_keys.counters, mapping=saved)
            self._counters.update({k: v for k, v in saved.items() if k in self._counters})
        # A Redis that outlived an earlier start of this run (external, persistent) still holds
        # its episodes, stats and heartbeats: read only new episodes, forget old roles.
        newest = self.client.xrevrange(self.redis_keys.telemetry, count=1)
        self._last_telemetry = newest[0][0] if newest else "0-0"
        self.client.delete(self.redis_keys.stats, self.redis_keys.heartbeats)
        if not ray.is_initialized():
            self._start_ray(resources)
        _warn_if_redis_unreachable(url)
        # replay snapshots come from the checkpoint's own set (previous/ after a fallback)
        self._set_dir = checkpoint.get(SET_DIR_KEY, self.run_dir) if checkpoint else self.run_dir
        self._start_roles(resources, checkpoint["learner"] if checkpoint else None)

    def _claim_run_id(self, resources: contextlib.ExitStack, url: str) -> None:
        """Takes the run id's lease in Redis, which a thread renews until the run ends: a second
        run whose directory has the same name is refused while this one holds it. A new run
        then drops what an earlier start under this id left in a Redis that persists (one that
        died before its first checkpoint): its counters would count for this run."""
        mine = str(self.run_dir.resolve())
        holder = self._take_lease(mine)
        if holder is not None:
            raise ValueError(
                f"Redis {url} is in use by the run in {holder}: a run's Redis keys are named "
                f"after its directory's name ({self.endpoint.run_id!r}), so two runs at once "
                "need different names or separate Redis servers (a stopped run frees the name "
                f"within {DRIVER_LEASE_S} s)"
            )
        stop = threading.Event()
        renewer = threading.Thread(target=self._keep_lease, args=(mine, stop), daemon=True)
        renewer.start()

        def release() -> None:
            stop.set()
            renewer.join()
            self.client.eval(_RELEASE_SCRIPT, 1, self.redis_keys.driver, mine)

        resources.callback(quietly, "releasing the run id in Redis", release)
        if self.new_run:
            left = [name for name in self.redis_keys.data if self.client.exists(name)]
            if left:
                self.client.delete(*left)
                logger.warning("Redis held %s of an earlier start of run %r that wrote no "
                               "checkpoint: dropped, this run starts from 0", ", ".join(left),
                               self.endpoint.run_id)  # fmt: skip

    def _take_lease(self, mine: str) -> str | None:
        """Sets or renews the lease unless another run holds it; returns that run's directory."""
        holder = self.client.eval(_CLAIM_SCRIPT, 1, self.redis_keys.driver, mine, DRIVER_LEASE_S)
        return holder.decode() if holder is not None else None

    def _keep_lease(self, mine: str, stop: threading.Event) -> None:
        """Renews the lease every DRIVER_LEASE_S / 6 until `stop` (through a Redis outage too),
        so that it holds while the run stops, evaluates and checkpoints at its end."""
        while not stop.wait(DRIVER_LEASE_S / 6):
            try:
                holder = self._take_lease(mine)
            except redis.RedisError:
                continue  # the driver's loop says that Redis is down
            if holder is not None:  # taken while Redis did not answer for DRIVER_LEASE_S
                logger.error("the run in %s holds this run's id in Redis: the two runs mix "
                             "their experience and counters; stop one", holder)  # fmt: skip

    def _start_ray(self, resources: contextlib.ExitStack) -> None:
        config = self.config
        head = None
        if config.ray_head_port is not None:
            head = RayHead(
                config.ray_head_port, config.ray_head_cpus, config.ray_dashboard_port, self.run_dir
            )
            resources.callback(quietly, "stopping the Ray head", head.stop)
        # "local": a private Ray even where `ray start` left its address in /tmp/ray.
        address = head.address if head else config.ray_address or os.getenv("RAY_ADDRESS")
        address = address or "local"
        # A private local Ray gets CPUs for the learner and every requested actor.
        wanted = 1 + (config.distributed.num_actors or 1)
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        ray.init(
            address=address,
            num_cpus=max(os.cpu_count() or 1, wanted) if address == "local" else None,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
        resources.callback(quietly, "shutting Ray down", ray.shutdown)
        # ray.init takes SIGTERM (sys.exit): the run's own handler comes back at once, so that a
        # stop during the rest of the start (up to minutes, for the learner) ends the run cleanly
        for sig, handler in handlers.items():
            with contextlib.suppress(ValueError, TypeError):  # not the main thread; not Python's
                signal.signal(sig, handler)

    def _start_roles(self, resources: contextlib.ExitStack, learner_state: dict | None) -> None:
        config, distributed = self.config, self.config.distributed
        resources.callback(quietly, "killing the role processes", self._kill_roles)
        # Shards write their snapshots into the run directory: keep them on this (the driver's)
        # node.
        here = ray.get_runtime_context().get_node_id()
        on_this_node = NodeAffinitySchedulingStrategy(here, soft=False)
        self.shards = [
            ShardWorker.options(
                name=f"mario-{self.endpoint.run_id}-shard-{i}", scheduling_strategy=on_this_node
            ).remote(
                self.specs.replay(i),
                self.endpoint,
                str(replay_snapshot_path(self._set_dir, i)),
                str(self.run_dir),
            )
            for i in range(distributed.num_shards)
        ]
        # The learner: on a GPU when the cluster has one, else on this node; it holds one CPU.
        cpus_before_learner = free_cpus()
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1 and config.learner.device != "cpu"
        self._learner_options = {
            "num_gpus": 1 if use_gpu else 0,
            "scheduling_strategy": NodeAffinitySchedulingStrategy(here, soft=True),
        }
        self._kept = KeptState(learner_state)
        self._start_learner(learner_state)
        # Actors: one CPU each, restarted by Ray if they die, more as CPUs join.
        maximum = distributed.resolved_max_actors
        initial = distributed.num_actors or max(1, cpus_before_learner - 1)
        initial = min(initial, maximum) if maximum is not None else initial

        def make_actor(actor_id: int, band: int, bands: int):
            return ActorWorker.remote(self.specs.actor(actor_id, band, bands), self.endpoint)

        self.actors = ActorPool(make_actor, initial, maximum)
        logger.info("started %d actors (max %s)", initial, maximum or "no cap")
        if config.eval.every_env_steps:
            self.evaluator = EvalWorker.options(scheduling_strategy=on_this_node).remote(
                config, self.endpoint
            )

    # -- while it runs --------------------------------------------------------------------------

    def advance(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            if self.embedded is not None:
                self.embedded.restart_if_dead()
            self._check_learner()
            self.actors.tick()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.25))

    def _start_learner(self, state: dict | None, updates_floor: int = 0) -> None:
        self.learner = LearnerWorker.options(**self._learner_options).remote(
            self.specs.learner(), self.endpoint, self.shards,
            prefetch=self.config.distributed.prefetch,
            batches_per_request=self.config.distributed.batches_per_request, state=state,
            updates_floor=updates_floor,
        )  # fmt: skip
        self._call(self.learner.updates.remote())  # weights are published before actors start
        self.learner_run = self.learner.run.remote()

    def _check_learner(self) -> None:
        """The learner's loop ends only on stop(). If its process died (SIGKILL, OOM, a lost
        node), a new learner continues from the newest state the driver holds; an error of
        its own is fatal, with that error."""
        if _finished(self.learner_run):
            try:
                ray.get(self.learner_run)
            except ray.exceptions.ActorDiedError as error:  # the process, not the code, failed
                self._restart_learner(error)
                return
            except ray.exceptions.RayError:
                self._call(self.learner_run)  # raises RoleFailed with the learner's own error
            raise RoleFailed("the learner loop ended without being stopped")
        self._kept.refresh(self.learner)

    def _restart_learner(self, error: Exception) -> None:
        self.learner_restarts += 1
        if self.learner_restarts > MAX_LEARNER_RESTARTS:
            raise RoleFailed(f"the learner died {self.learner_restarts} times; last: {error}")
        reached, published = self._counters.get("updates", 0), 0
        with contextlib.suppress(redis.RedisError, ValueError):
            reached = max(reached, int(self.client.hget(self.redis_keys.counters, "updates") or 0))
        # the counter is written every 2 s, the weights every 50 updates: the newer one counts,
        # and the new learner's first weights get a version above what the actors hold (they
        # skip a version they have)
        with contextlib.suppress(redis.RedisError, ValueError):
            published = int(self.client.get(self.redis_keys.weights_version) or 0)
        floor, reached = max(reached, published + 1), max(reached, published)
        state = self._kept.state
        kept = int(state["updates"]) if state else 0
        with contextlib.suppress(Exception):
            ray.kill(self.learner, no_restart=True)
        logger.warning(
            "the learner died (%s); restarting it from its state of update %d, kept %.0f s ago: "
            "%d updates lost (restart %d of at most %d)", type(error).__name__, kept,
            self._kept.age_s(), max(reached - kept, 0), self.learner_restarts,
            MAX_LEARNER_RESTARTS,
        )  # fmt: skip
        with contextlib.suppress(redis.RedisError):  # for `mario chaos`'s books
            self.client.hincrby(self.redis_keys.counters, "updates_lost", max(reached - kept, 0))
        self._kept.forget_pending()
        self._start_learner(state, updates_floor=floor)

    def _call(self, ref, timeout: float = 120):
        """ray.get of the learner's answers, with its failure named as the learner's."""
        try:
            return ray.get(ref, timeout=timeout)
        except ray.exceptions.RayTaskError as error:
            logger.error("the learner failed:\n%s", error)  # with the learner's traceback
            cause = error.cause if error.cause is not None else error
            raise RoleFailed.of("the learner", cause) from error
        except ray.exceptions.RayError as error:
            raise RoleFailed(f"the learner is unavailable: {error}") from error

    def _redis_down(self, what: str, error: Exception) -> None:
        """A Redis command of the driver failed: the run goes on with what it last read."""
        now = time.monotonic()
        if now - self._redis_warned_at > 10:
            logger.warning("Redis unavailable (%s: %s): %s uses what it last read",
                           type(error).__name__, error, what)  # fmt: skip
            self._redis_warned_at = now
        if self.embedded is not None:
            self.embedded.restart_if_dead()

    def counters(self) -> dict[str, int]:
        try:
            raw = self.client.hgetall(self.redis_keys.counters)
        except redis.RedisError as error:
            self._redis_down("counters", error)
            return self._counters
        counters, bad = dict.fromkeys(BACKEND_COUNTERS, 0), set()
        for raw_name, value in raw.items():
            name = raw_name.decode(errors="replace")
            count = self._checked(f"counter {name}", value, int)
            if count is None:  # left out: the driver keeps what it last read
                bad.add(name)
            else:
                counters[name] = count
        # Never backwards: an external Redis that restarted without its data (or lost its last
        # writes) gets back the counts the driver last read, and counts on from them.
        behind = {k: v for k, v in self._counters.items()
                  if counters.get(k, 0) < v and k not in bad}  # fmt: skip
        if behind:
            logger.warning(
                "Redis lost counts (%s): writing back what the driver last read",
                ", ".join(f"{k} {counters.get(k, 0)} < {v}" for k, v in behind.items()),
            )
            with contextlib.suppress(redis.RedisError):
                pipe = self.client.pipeline(transaction=True)
                for name, value in behind.items():
                    pipe.hincrby(self.redis_keys.counters, name, value - counters.get(name, 0))
                pipe.execute()
        self._counters = {k: max(v, self._counters.get(k, 0)) for k, v in counters.items()}
        return self._counters

    def new_episodes(self) -> list[dict]:
        try:
            response = self.client.xread(
                {self.redis_keys.telemetry: self._last_telemetry}, count=1000
            )
        except redis.RedisError as error:
            self._redis_down("episodes", error)
            return []
        episodes = []
        for _, entries in response or []:
            for entry_id, fields in entries:
                self._last_telemetry = entry_id
                try:
                    episodes.append(episode_record(decode_record(fields.get(b"m", b""))))
                except (WireError, KeyError, ValueError, TypeError) as error:
                    self.malformed_records += 1
                    logger.warning("dropped telemetry entry %s: %s", entry_id, error)
        return episodes

    def stats(self) -> dict[str, float]:
        try:
            self._stats = self._read_stats()
        except redis.RedisError as error:
            self._redis_down("stats", error)
        return self._stats

    def role_stats(self) -> dict[str, float]:
        """What the roles report through Redis: the learner's numeric stats, the actors' rates
        and the policy lag. A record that does not decode, an actor's that lacks one of
        ACTOR_STATS or holds a non-number there, or a weights version that is no integer, is
        dropped and counted once (it stays in Redis until its role writes again)."""
        stats, actors = {}, {}
        running = self._running_actors()
        for raw_name, blob in self.client.hgetall(self.redis_keys.stats).items():
            name = raw_name.decode(errors="replace")
            record = self._checked(f"stats of {name}", blob, _actor_stats if
                                   name.startswith("actor-") else decode_record)  # fmt: skip
            if record is None:
                continue
            if name == "learner":
                stats = {k: v for k, v in record.items() if isinstance(v, int | float)}
            elif name.startswith("actor-") and (running is None or name in running):
                actors[name] = record
        stats["actors/env_steps_per_s"] = sum(s["env_steps_per_s"] for s in actors.values())
        stats["actors/frames_per_s"] = sum(s["frames_per_s"] for s in actors.values())
        for name, s in actors.items():
            stats[f"actors/{name}/frames_per_s"] = s["frames_per_s"]
        raw = self.client.get(self.redis_keys.weights_version) or b"0"
        version = self._checked("weights version", raw, int)
        if actors and version is not None:
            stats["policy_lag"] = version - min(s["policy_version"] for s in actors.values())
        return stats

    def _running_actors(self) -> set[str] | None:
        """The names of the pool's actors (one whose node left the cluster is dropped from it,
        and its last record stays in Redis); None before there is a pool."""
        if self.actors is None:
            return None
        return {f"actor-{index}" for index in self.actors.members}

    def _checked(self, what: str, value: bytes, parse):
        """parse(value), or None for a value read from Redis that is not what its writer writes:
        dropped and counted once while it stays the same (the driver reads it every second)."""
        try:
            parsed = parse(value)
        except (WireError, KeyError, TypeError, ValueError) as error:
            if self._bad.get(what) != value:
                self._bad[what] = value
                self.malformed_records += 1
                logger.warning("dropped %s: %s", what, error)
            return None
        self._bad.pop(what, None)
        return parsed

    def _read_stats(self) -> dict[str, float]:
        stats = self.role_stats()
        shard_stats = ray.get([shard.stats.remote() for shard in self.shards], timeout=60)
        stats.update(_merge_shard_stats(shard_stats))
        stats["actors/running"] = len(self.actors.members)
        stats["actors/lost"] = self.actors.lost
        stats["stream_lag_chunks"] = self.client.xlen(self.redis_keys.experience)
        stats["driver/malformed_records"] = self.malformed_records  # dropped telemetry and stats
        return stats

    def state(self) -> dict:
        """The learner's state now; if it cannot give it (it died), the newest state kept."""
        try:
            state = self._call(self.learner.state_dict.remote())
        except RoleFailed as error:
            if self._kept.state is None:
                raise
            logger.error("the learner cannot give its state (%s): the checkpoint takes the one "
                         "kept %.0f s ago", error, self._kept.age_s())  # fmt: skip
            kept = self._kept.state
            # its update count goes on from the counter, as a restarted learner's would
            updates = max(int(kept["updates"]), self._counters.get("updates", 0))
            return {"learner": {**kept, "updates": updates}, "rng": {}}
        self._kept.take(state)
        return {"learner": state, "rng": {}}

    def snapshot_replay(self, run_dir: pathlib.Path) -> list[pathlib.Path]:
        paths = [replay_snapshot_path(run_dir, i) for i in range(len(self.shards))]
        locked = ray.get([shard.snapshot.remote(str(path))
                          for path, shard in zip(paths, self.shards, strict=True)],
                         timeout=600)  # fmt: skip
        logger.info("replay snapshots written (%s s); shards locked (no sampling, no ingest) for "
                    "%s s", ", ".join(f"{total:.1f}" for _, total in locked),
                    ", ".join(f"{held:.2f}" for held, _ in locked))  # fmt: skip
        return paths

    def start_eval(self, seeds: list[int], best_rank, video_path: pathlib.Path) -> None:
        # The evaluator runs on this node, so it writes the video into the run directory.
        self._eval_ref = self.evaluator.evaluate.remote(seeds, best_rank, str(video_path))

    def eval_result(self) -> dict | None:
        if self._eval_ref is None or not _finished(self._eval_ref):
            return None
        ref, self._eval_ref = self._eval_ref, None
        try:
            return ray.get(ref)
        except ray.exceptions.RayError as error:  # a restarted evaluator takes the next round
            logger.warning("evaluation failed: %s", error)
            return {}

    # -- stop ----------------------------------------------------------------------------------

    def stop_roles(self) -> None:
        """Actors first (they flush their last chunks), then the learner, then ingest threads."""
        if self.actors is not None:
            self.actors.stop(timeout=60, embedded=self.embedded)
        if self.learner is not None:
            self.learner.stop.remote()
            wait_keeping_redis([self.learner_run], 60, self.embedded)
        # The shards take in what the actors flushed, then stop their threads.
        refs = [shard.stop.remote() for shard in self.shards]
        wait_keeping_redis(refs, 60, self.embedded)
        drained = ray.get(refs, timeout=1)  # GetTimeoutError if a shard has not stopped
        logger.info("the shards read %d chunks left in the stream", sum(drained))

    def _kill_roles(self) -> None:
        if self.actors is not None:
            self.actors.kill()
        others = [handle for handle in (self.learner, self.evaluator) if handle is not None]
        for handle in [*self.shards, *others]:
            ray.kill(handle, no_restart=True)


class KeptState:
    """The newest learner state the driver holds (taken every KEEP_LEARNER_STATE_S, and at each
    checkpoint): what a restarted learner continues from, and what the final checkpoint takes
    if the learner cannot give its own."""

    def __init__(self, state: dict | None):
        self.state = state
        self._taken_at = time.monotonic()
        self._pending = None

    def age_s(self) -> float:
        return time.monotonic() - self._taken_at

    def take(self, state: dict) -> None:
        self.state, self._taken_at = state, time.monotonic()

    def forget_pending(self) -> None:
        self._pending = None

    def refresh(self, learner) -> None:
        """Asks the learner for its state when the kept one is old; takes it once it came."""
        if self._pending is not None:
            if _finished(self._pending):
                ref, self._pending = self._pending, None
                with contextlib.suppress(ray.exceptions.RayError):  # a dead learner: keep ours
                    self.take(ray.get(ref))
        elif self.age_s() >= KEEP_LEARNER_STATE_S:
            self._pending = learner.state_dict.remote()


def _actor_stats(blob: bytes) -> dict[str, float]:
    """An actor's stats record: its ACTOR_STATS, each a number (TypeError, KeyError if not)."""
    record = decode_record(blob)
    for key in ACTOR_STATS:
        if isinstance(record[key], bool) or not isinstance(record[key], int | float):
            raise TypeError(f"{key}: expected a number, got {record[key]!r}")
    return {key: record[key] for key in ACTOR_STATS}


def _finished(ref) -> bool:
    ready, _ = ray.wait([ref], timeout=0)
    return bool(ready)


def _merge_shard_stats(per_shard: list[dict]) -> dict:
    merged: dict = {}
    for stats in per_shard:
        for key, value in stats.items():
            merged[key] = merged.get(key, 0) + value
    if per_shard:
        merged["replay/beta"] = per_shard[0]["replay/beta"]
        inserted = max(merged.get("replay/inserted", 0), 1)
        merged["replay/sample_to_insert_ratio"] = merged.get("replay/sampled", 0) / inserted
    return merged


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


def _without_password(url: str) -> str:
    """The URL as it may be shown: a password in it is replaced by ***."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


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
