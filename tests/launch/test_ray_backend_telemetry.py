"""The Ray backend's driver reads episode telemetry from a real redis-server: a malformed entry
(undecodable, a field missing or not of its type) is counted and dropped, the entries around it
are read, and the stream keeps every entry."""

import dataclasses

import msgpack
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


def test_the_driver_counts_and_drops_malformed_telemetry(redis_url, tmp_path):
    backend = RayBackend(TrainConfig(), tmp_path)
    endpoint = RedisEndpoint(redis_url, "run-t")
    backend.client, backend.redis_keys = endpoint.connect(outage_s=0), endpoint.keys
    client = redis.Redis.from_url(redis_url)
    stream = endpoint.keys.telemetry
    for fields in ({"m": _episode(700)},
                   {"m": b"\xc1 not msgpack"},  # undecodable
                   {"m": msgpack.packb({"kind": "episode", "nested": {"a": 1}})},  # not flat
                   {"m": encode_record({"kind": "episode", "actor": "actor-0"})},  # no fields
                   {"other": b"x"},  # no record at all
                   {"m": _episode("far")},  # a field not of its type
                   {"m": _episode(900, policy_version=None)},
                   {"m": _episode(900, episode_return="12.5x")},
                   {"m": _episode(900, actor=3)},
                   {"m": encode_record({k: v for k, v in decode_record(_episode(900)).items()
                                        if k != "actor"})},
                   {"m": _episode(1200)}):  # fmt: skip
        client.xadd(stream, fields)
    episodes = backend.new_episodes()
    assert [e["episode/x_pos"] for e in episodes] == [700, 1200]
    assert episodes[0]["episode/policy_version"] == 7 and episodes[0]["episode/actor"] == "actor-0"
    assert backend.malformed_records == 9
    assert backend.new_episodes() == []  # read once
    assert client.xlen(stream) == 11  # nothing stored is lost
    client.xadd(stream, {"m": _episode(1500)})
    assert [e["episode/x_pos"] for e in backend.new_episodes()] == [1500]
    backend.client.close()
    client.close()
