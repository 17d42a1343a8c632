"""The replay shard as a Ray actor (local Ray, a real redis-server): SIGKILLed mid-ingest, Ray
restarts it, and no chunk that reached Redis is lost or counted twice. Not in the Ray-cluster
test group: its two-CPU local Ray is small and short."""

import os
import signal
import threading
import time

import numpy as np
import ray
import redis

from common.experience import synthetic_chunk
from common.redis_io import REPLAY_GROUP, RedisEndpoint, RedisKeys
from common.wire import encode_chunk
from launch.ray_backend import ShardWorker
from launch.roles import ReplaySpec
from replay_server.replay import ReplayConfig


def test_killed_shard_loses_no_chunk_that_was_in_redis(redis_url, tmp_path):
    client = redis.Redis.from_url(redis_url)
    keys = RedisKeys("kill-test")
    # samples_per_insert ≈ 0: the rate limiter never holds inserts back (no learner here)
    config = ReplayConfig(capacity=20_000, min_size_to_sample=10, samples_per_insert=1e-6)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        spec = ReplaySpec(shard_id=0, replay=config, stack=4, num_actions=5, seed=0)
        endpoint = RedisEndpoint(redis_url, "kill-test")
        shard = ShardWorker.remote(spec, endpoint, str(tmp_path / "replay-0.npz"), str(tmp_path))
        rng = np.random.default_rng(0)
        message = encode_chunk(synthetic_chunk(rng, 20), "kill-test")
        written, stop = 0, threading.Event()

        def write():
            nonlocal written
            while not stop.is_set():
                pipe = client.pipeline(transaction=True)
                pipe.xadd(keys.experience, {b"c": message})
                pipe.hincrby(keys.counters, "chunks_written", 1)
                pipe.execute()
                written += 1
                time.sleep(0.002)

        def inserted() -> int:
            return int(client.hget(keys.counters, "chunks_inserted") or 0)

        writer = threading.Thread(target=write)
        writer.start()
        deadline = time.monotonic() + 60
        while inserted() < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert inserted() >= 20  # the shard is ingesting while chunks keep coming
        first_pid = ray.get(shard.pid.remote())
        os.kill(first_pid, signal.SIGKILL)  # a crash mid-ingest; Ray restarts the shard
        at_kill = written
        deadline = time.monotonic() + 60
        while written < at_kill + 100 and writer.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)  # chunks go on arriving while Ray restarts it
        assert written >= at_kill + 100, "the writer stopped"
        stop.set()
        writer.join()
        assert ray.get(shard.pid.remote()) != first_pid
        client.xadd(keys.experience, {b"c": b"garbage"})  # one reject for the books
        written += 1
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            counters = {k.decode(): int(v) for k, v in client.hgetall(keys.counters).items()}
            done = counters.get("chunks_inserted", 0) + counters.get("chunks_rejected", 0)
            if done >= written:
                break
            time.sleep(0.2)
        assert counters["chunks_written"] == written - 1
        assert counters["chunks_inserted"] + counters["chunks_rejected"] == written
        assert counters["chunks_rejected"] == 1
        assert client.xpending(keys.experience, REPLAY_GROUP)["pending"] == 0
    finally:
        ray.shutdown()
