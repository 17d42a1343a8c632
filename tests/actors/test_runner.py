"""The actor loop through a Redis outage (real redis-server, killed and restarted): it plays on,
keeps what it cannot send in a bounded buffer, and once Redis is back every chunk, episode and
env step is counted exactly once; also when Redis applied a batch whose answer was lost."""

import dataclasses
import os
import signal
import threading
import time

import redis

from actors.actor import ActorConfig, ActorCore
from actors.runner import ActorRunner
from common.config import EnvConfig, NetworkConfig
from common.redis_io import EmbeddedRedis, RedisEndpoint, RedisKeys
from common.wire import decode_chunk
from tests.common.reply_dropper import ReplyDropper
from tests.learner.test_learning import Corridor


def _wait(condition, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _corridor_actor() -> ActorCore:
    return ActorCore(
        dataclasses.replace(EnvConfig(), action_set="right_jump"),
        ActorConfig(envs_per_actor=2, chunk_length=10),
        NetworkConfig(conv_channels=(4, 8, 8), hidden=16),
        epsilons=[1.0, 1.0], env_factory=Corridor,
    )  # fmt: skip


def test_an_actor_plays_through_a_redis_outage_and_loses_nothing(tmp_path):
    server = EmbeddedRedis(data_dir=tmp_path / "redis")
    try:
        endpoint = RedisEndpoint(server.url, "outage")
        core = _corridor_actor()
        reset_frames = core.frames  # the envs' first resets, before the runner plays
        runner = ActorRunner(core, endpoint, heartbeat_s=0.2, max_unsent_chunks=20)
        thread = threading.Thread(target=runner.run, daemon=True)
        thread.start()
        _wait(lambda: runner.chunks_written >= 5)
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait()
        steps_at_outage = core.env_steps
        _wait(lambda: core.env_steps > steps_at_outage + 100)  # it plays on
        _wait(lambda: len(runner.unsent) >= 20)  # until its buffer is full: then it waits
        time.sleep(0.5)
        assert len(runner.unsent) <= 20 + 2  # one step's chunks can come on top
        assert server.restart_if_dead()
        _wait(lambda: not runner.unsent and runner.chunks_written > 25)
        runner.stop()
        thread.join(timeout=30)
        assert not thread.is_alive()
        client, keys = redis.Redis.from_url(server.url), RedisKeys("outage")
        counters = {k.decode(): int(v) for k, v in client.hgetall(keys.counters).items()}
        assert client.xlen(keys.experience) == counters["chunks_written"] == runner.chunks_written
        assert counters["env_steps"] == core.env_steps
        assert counters["frames"] == core.frames - reset_frames
        entries = client.xrange(keys.experience)
        chunks = [decode_chunk(fields[b"c"], "outage", 4, 2) for _, fields in entries]
        assert counters["transitions_written"] == sum(len(chunk) for chunk in chunks)
        assert client.xlen(keys.telemetry) == runner.episodes > 0
    finally:
        server.stop()


def test_batches_whose_replies_were_lost_are_counted_once(redis_server, redis_url):
    """Redis applies a batch and the answer never comes (the server died right then, or the
    network): the actor sends it again, and still every chunk, episode and env step counts once."""
    dropper = ReplyDropper(redis_server.port)
    try:
        core = _corridor_actor()
        reset_frames = core.frames
        runner = ActorRunner(core, RedisEndpoint(dropper.url, "lost"), heartbeat_s=0.2)
        thread = threading.Thread(target=runner.run, daemon=True)
        thread.start()
        _wait(lambda: runner.episodes >= 3 and runner.chunks_written >= 3)
        for channel in ("records", "counts", "chunks"):  # each writer's batch once
            dropped = dropper.dropped
            dropper.arm(f":{channel}\r\n".encode())  # the producer name ends the argument
            _wait(lambda dropped=dropped: dropper.dropped > dropped)
            _wait(lambda channel=channel: runner._writers[channel].replayed == 1)
        runner.stop()
        thread.join(timeout=30)
        assert not thread.is_alive()
        client, keys = redis.Redis.from_url(redis_url), RedisKeys("lost")
        counters = {k.decode(): int(v) for k, v in client.hgetall(keys.counters).items()}
        assert client.xlen(keys.experience) == counters["chunks_written"] == runner.chunks_written
        assert counters["env_steps"] == core.env_steps
        assert counters["frames"] == core.frames - reset_frames
        assert client.xlen(keys.telemetry) == runner.episodes
    finally:
        dropper.close()


def test_counts_held_back_by_a_lost_request_go_out_with_the_later_ones(redis_server, redis_url):
    dropper = ReplyDropper(redis_server.port)
    try:
        core = _corridor_actor()
        reset_frames = core.frames
        runner = ActorRunner(core, RedisEndpoint(dropper.url, "held"))
        runner._send_counts()  # loads the script
        for _ in range(10):
            core.step()
        dropper.arm(b":counts\r\n", request=True)  # this report never reaches Redis
        assert not runner._redis("heartbeat", runner._send_counts)
        assert runner._writers["counts"].busy
        for _ in range(20):
            core.step()
        runner._flush_before_exit(timeout_s=10)
        counters = redis.Redis.from_url(redis_url).hgetall(RedisKeys("held").counters)
        assert int(counters[b"env_steps"]) == core.env_steps == 30 * 2  # two envs
        assert int(counters[b"frames"]) == core.frames - reset_frames
        core.close()
    finally:
        dropper.close()


def test_a_bad_weights_version_or_run_count_is_counted_and_skipped(redis_url):
    # Both are written by the run's own roles; garbage there once ended the actor (int("v9")
    # raised ValueError past its `except WireError`), and with it the run.
    runner = ActorRunner(_corridor_actor(), RedisEndpoint(redis_url, "bad-version"))
    client, keys = redis.Redis.from_url(redis_url), RedisKeys("bad-version")
    for version, env_steps in (("v9", 10), (3, "many")):
        client.set(keys.weights_version, version)
        client.hset(keys.counters, "env_steps", env_steps)
        runner._poll_weights()
    assert runner.bad_weights == 2 and runner.weight_updates == 0
    client.hset(keys.counters, "env_steps", 500)
    client.delete(keys.weights_version)
    runner._poll_weights()  # good values are read again
    assert runner.bad_weights == 2
