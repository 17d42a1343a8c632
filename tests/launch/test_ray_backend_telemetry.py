"""The Ray backend's driver reads episode telemetry and the roles' stats from a real
redis-server: a malformed entry (undecodable, a field missing or not of its type) is counted and
dropped, the entries around it are read, and Redis keeps every entry."""

import dataclasses

import msgpack
import pytest
import redis

from actors.actor import EpisodeResult
from common.redis_io import RedisEndpoint
from common.wire import decode_record, encode_record
from launch.config import TrainConfig
from launch.ray_backend import RayBackend


def _episode(x_pos, **changed) -> bytes:
    episode = EpisodeResult(env_slot=0, episode_return=12.5, length=90, max_x_pos=x_pos,
                            flag_get=False, level="1-1", epsilon=0.1, truncated=False)  # fmt: skip
    record = dataclasses.asdict(episode)
    record.update(kind="episode", actor="actor-0", policy_version=7)
    record.update(changed)
    return encode_record(record)


@pytest.fixture
def reader(redis_url, tmp_path):
    """A RayBackend's driver side on a real redis-server (no Ray), and a client of its own."""
    backend = RayBackend(TrainConfig(), tmp_path)
    endpoint = RedisEndpoint(redis_url, tmp_path.name)
    backend.client, backend.redis_keys = endpoint.connect(outage_s=0), endpoint.keys
    client = redis.Redis.from_url(redis_url)
    yield backend, endpoint.keys, client


def test_the_driver_counts_and_drops_malformed_telemetry(reader):
    backend, keys, client = reader
    stream = keys.telemetry
    for fields in ({"m": _episode(700)},
                   {"m": b"\xc1 not msgpack"},  # undecodable
                   {"m": msgpack.packb({"kind": "episode", "nested": {"a": 1}})},  # not flat
                   {"m": encode_record({"kind": "episode", "actor": "actor-0"})},  # no fields
                   {"other": b"x"},  # no record at all
                   {"m": _episode("far")},  # a field not of its type
                   {"m": _episode(900, policy_version=None)},
                   {"m": _episode(900, episode_return="12.5x")},
                   {"m": _episode(900, actor=3)},
                   {"m": _episode(float("inf"))},  # int(inf) would raise OverflowError
                   {"m": _episode(900, epsilon=float("nan"))},
                   {"m": encode_record({k: v for k, v in decode_record(_episode(900)).items()
                                        if k != "actor"})},
                   {"m": _episode(1200)}):  # fmt: skip
        client.xadd(stream, fields)
    episodes = backend.new_episodes()
    assert [e["episode/x_pos"] for e in episodes] == [700, 1200]
    assert episodes[0]["episode/policy_version"] == 7 and episodes[0]["episode/actor"] == "actor-0"
    assert backend.malformed_records == 11
    assert backend.new_episodes() == []  # read once
    assert client.xlen(stream) == 13  # nothing stored is lost
    client.xadd(stream, {"m": _episode(1500)})
    assert [e["episode/x_pos"] for e in backend.new_episodes()] == [1500]


def test_the_driver_counts_and_drops_malformed_stats_once(reader):
    backend, keys, client = reader
    good = {"env_steps_per_s": 150.0, "frames_per_s": 600.0, "policy_version": 40, "frames": 9}
    client.hset(keys.stats, mapping={
        "learner": encode_record({"learner/loss": 0.5, "learner/device": "cpu"}),
        "actor-0": encode_record(good),
        "actor-1": encode_record({**good, "frames_per_s": None}),  # not a number
        "actor-2": encode_record({"env_steps_per_s": 1.0, "policy_version": 3}),  # a field short
        "actor-3": encode_record({**good, "policy_version": True}),  # a bool is no number here
        "actor-4": b"\xc1 not msgpack",
        "actor-5": msgpack.packb({b"frames_per_s": 600.0}),  # a name that is not text
    })  # fmt: skip
    client.set(keys.weights_version, 52)
    for _ in range(2):  # each bad record is counted once, however often it is read
        stats = backend.role_stats()
        assert stats == {"learner/loss": 0.5, "actors/env_steps_per_s": 150.0,
                         "actors/frames_per_s": 600.0, "actors/actor-0/frames_per_s": 600.0,
                         "policy_lag": 12}  # fmt: skip
        assert backend.malformed_records == 5
    client.hset(keys.stats, "actor-1", encode_record(good))  # its next heartbeat
    assert backend.role_stats()["actors/frames_per_s"] == 1200.0
    client.hset(keys.stats, "actor-1", encode_record({**good, "frames_per_s": "x"}))
    backend.role_stats()
    assert backend.malformed_records == 6
    client.set(keys.weights_version, b"v52")  # not what the learner writes
    assert "policy_lag" not in backend.role_stats()
    assert backend.malformed_records == 7
    assert client.hlen(keys.stats) == 7  # nothing stored is lost


def test_a_counter_that_is_not_an_integer_is_dropped_and_the_last_count_kept(reader):
    backend, keys, client = reader
    counters = keys.counters
    client.hset(counters, mapping={"env_steps": 5000, "frames": 20000, "updates": 600})
    assert backend.counters()["env_steps"] == 5000
    client.hset(counters, "env_steps", "5k")  # not what HINCRBY writes
    client.hincrby(counters, "updates", 10)
    for _ in range(2):
        read = backend.counters()
        assert (read["env_steps"], read["frames"], read["updates"]) == (5000, 20000, 610)
    assert backend.malformed_records == 1  # once, however often it is read
    assert client.hget(counters, "env_steps") == b"5k"  # not written over: it is not ours
    client.hset(counters, "env_steps", 5200)
    assert backend.counters()["env_steps"] == 5200


def test_the_stats_of_an_actor_dropped_from_the_pool_no_longer_count(reader):
    # An actor whose node left the cluster is dropped from the pool; its last record stays in
    # Redis and once counted for ever (its frames/s in the totals, the policy lag growing)
    from launch.ray_backend import ActorPool

    backend, keys, client = reader
    good = {"env_steps_per_s": 150.0, "frames_per_s": 600.0, "policy_version": 40, "frames": 9}
    client.hset(
        keys.stats,
        mapping={
            "actor-0": encode_record(good),
            "actor-1": encode_record({**good, "policy_version": 2}),
        },
    )
    client.set(keys.weights_version, 52)
    backend.actors = ActorPool(make_actor=None, initial=0, maximum=None)  # no Ray: no actor yet
    backend.actors.members = {0: None}  # actor 1 was dropped
    stats = backend.role_stats()
    assert stats["actors/frames_per_s"] == 600.0 and stats["policy_lag"] == 12
    assert "actors/actor-1/frames_per_s" not in stats and backend.malformed_records == 0
