"""`mario bench feed`: sampled batches per second that replay shards serve a learner through Ray.

The learner's side of `mario train` without its update: the real ShardWorkers (filled through
Redis, as actors fill them, with their rate limiter opened) and the learner's RayReplayClient,
`prefetch` requests in flight, each batch's priorities sent back. Set against `mario bench
learner`, it says whether a learner (a GPU one above all) would wait for its data. An upper
bound: in `mario train` the shards also take in actors' chunks meanwhile (under the lock that
sampling takes), and each shard holds --replay.capacity transitions, not transitions_per_shard.
Each shard is filled through a stream of its own, so that each holds exactly its share.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import tempfile
import time

import numpy as np

from common.experience import synthetic_chunk
from common.redis_io import EmbeddedRedis, RedisEndpoint
from common.wire import encode_chunk
from launch.bench.checks import prepare_out
from launch.roles import ReplaySpec
from replay_server.replay import ReplayConfig

CHUNK = 100  # transitions per synthetic chunk, as actors send them


@dataclasses.dataclass(frozen=True)
class BenchFeedConfig:
    """Measure how fast the replay shards feed a learner through Ray (no update, no actors)."""

    shards: tuple[int, ...] = (1, 2)
    """Shard counts to measure."""
    batch_sizes: tuple[int, ...] = (32, 128)
    """Sampled batch sizes to measure."""
    prefetch: tuple[int, ...] = (4,)
    """Sample requests the learner keeps in flight (`--distributed.prefetch`)."""
    batches_per_request: tuple[int, ...] = (1, 4)
    """Batches each request asks for (`--distributed.batches-per-request`)."""
    transitions_per_shard: int = 20_000
    """Transitions each shard holds while it is sampled."""
    seconds: float = 5.0
    """Seconds of measured sampling per configuration (after a short warm-up)."""
    out: pathlib.Path = pathlib.Path("runs/bench/feed.json")
    """Where the JSON result is written."""

    def __post_init__(self) -> None:
        for name in ("shards", "batch_sizes", "prefetch", "batches_per_request"):
            values = getattr(self, name)
            if not values or min(values) < 1:
                raise ValueError(f"{name} {values} must be one or more numbers >= 1")
        if self.transitions_per_shard < max(CHUNK, *self.batch_sizes):
            raise ValueError(
                f"transitions_per_shard ({self.transitions_per_shard}) must be >= "
                f"{max(CHUNK, *self.batch_sizes)} (a chunk and the largest batch)"
            )
        if self.seconds <= 0:
            raise ValueError(f"seconds ({self.seconds}) must be > 0")


def _fill(endpoint: RedisEndpoint, transitions: int) -> None:
    """XADDs synthetic chunks to the run's experience stream, as actors do."""
    client, rng = endpoint.connect(), np.random.default_rng(0)
    chunks = [encode_chunk(synthetic_chunk(rng, CHUNK), endpoint.run_id) for _ in range(8)]
    pipe = client.pipeline(transaction=False)
    for index in range(-(-transitions // CHUNK)):
        pipe.xadd(endpoint.keys.experience, {"c": chunks[index % len(chunks)]})
        if index % 50 == 49:
            pipe.execute()
    pipe.execute()


def _wait_filled(shards: list, transitions: int, timeout_s: float = 300.0) -> None:
    """Until every shard has taken in the `transitions` sent to it."""
    deadline = time.monotonic() + timeout_s
    while True:
        taken = [stats["replay/inserted"] for stats in _stats(shards)]
        if min(taken) >= transitions:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the shards took in {taken} of {transitions} transitions each")
        time.sleep(0.2)


def _stats(shards: list) -> list[dict]:
    import ray

    return ray.get([shard.stats.remote() for shard in shards])


def measure(
    shards: list, batch_size: int, prefetch: int, seconds: float, batches_per_request: int = 1
) -> dict:
    """Batches per second of one configuration, as the learner draws them."""
    import ray

    from launch.ray_backend import RayReplayClient

    client = RayReplayClient(shards, prefetch, batches_per_request=batches_per_request)

    def draw(until: float) -> int:
        drawn = 0
        while time.perf_counter() < until:
            item = client.next_sample(batch_size)
            if item is None:
                continue
            shard_id, sample = item
            client.update_priorities(shard_id, sample.keys, np.abs(sample.returns) + 0.01)
            drawn += 1
        return drawn

    draw(time.perf_counter() + min(1.0, seconds / 4))  # warm-up
    start = time.perf_counter()
    batches = draw(start + seconds)
    elapsed = time.perf_counter() - start
    ray.get(list(client.inflight))  # nothing of this configuration runs into the next
    return {
        "shards": len(shards),
        "batch_size": batch_size,
        "prefetch": prefetch,
        "batches_per_request": batches_per_request,
        "batches_per_s": batches / elapsed,
        "samples_per_s": batches * batch_size / elapsed,
    }


def run(config: BenchFeedConfig) -> dict:
    import ray

    from launch.ray_backend import ShardWorker

    prepare_out(config.out)
    rows, per_shard = [], {}
    with contextlib.ExitStack() as resources:
        server = EmbeddedRedis()
        resources.callback(server.stop)
        ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)  # fmt: skip
        resources.callback(ray.shutdown)
        folder = pathlib.Path(resources.enter_context(tempfile.TemporaryDirectory()))
        replay = ReplayConfig(
            capacity=config.transitions_per_shard,
            min_size_to_sample=max(config.batch_sizes),
            rate_error_buffer=1e15,  # the rate limiter never holds either side
        )
        for count in config.shards:
            spec = ReplaySpec(shard_id=0, replay=replay, stack=4, num_actions=5, seed=0)
            nowhere = str(folder / "none")  # no snapshot: each shard starts empty
            endpoints = [
                RedisEndpoint(server.url, run_id=f"feed-{count}-{i}") for i in range(count)
            ]
            shards = [
                ShardWorker.remote(dataclasses.replace(spec, shard_id=i, seed=i), endpoints[i],
                                   nowhere, str(folder))
                for i in range(count)
            ]  # fmt: skip
            for endpoint in endpoints:
                _fill(endpoint, config.transitions_per_shard)
            _wait_filled(shards, config.transitions_per_shard)
            for batch_size in config.batch_sizes:
                for prefetch in config.prefetch:
                    for per_request in config.batches_per_request:
                        rows.append(measure(shards, batch_size, prefetch, config.seconds,
                                            per_request))  # fmt: skip
            per_shard[str(count)] = [
                {key.removeprefix("replay/"): stats[key]
                 for key in ("replay/size", "replay/sampled", "replay/priority_updates")}
                for stats in _stats(shards)
            ]  # fmt: skip
            for shard in shards:
                ray.kill(shard)
    result = {
        "seconds_each": config.seconds,
        "transitions_per_shard": config.transitions_per_shard,
        "cpus": os.cpu_count(),
        "ray": ray.__version__,
        "rows": rows,
        "shards_after": per_shard,  # shard count → each shard's size, sampled, priority updates
    }
    config.out.parent.mkdir(parents=True, exist_ok=True)
    config.out.write_text(json.dumps(result, indent=2) + "\n")
    return result
