"""`mario chaos`'s per-kill costs, from hand-written counter readings; its wait for the killed
roles' heartbeats, against a real redis-server."""

import itertools

import pytest
import redis

from common.redis_io import RedisKeys
from launch.chaos import _attribute, _wait_for_heartbeats, losses


def _counters(env_steps, written, updates, updates_lost=0, replay_lost=0):
    return {"env_steps": env_steps, "transitions_written": written, "updates": updates,
            "updates_lost": updates_lost, "replay_transitions_lost": replay_lost}  # fmt: skip


def test_each_kill_costs_what_the_counters_moved_until_the_next():
    kills = [
        {"t": 10.0, "role": "learner", "pid": 1, "counters": _counters(1000, 900, 50)},
        {"t": 20.0, "role": "shard", "pid": 2, "counters": _counters(1500, 1380, 70, 12)},
        {"t": 30.0, "role": "actor", "pid": 3, "counters": _counters(2000, 1900, 90, 12, 160)},
    ]
    # the readings of the run: the learner's loss shows at 15 s, the shard's only at 31 s (its
    # restart took longer than the actor's turn): each goes to the latest kill of its role
    readings = [_counters(0, 0, 0), _counters(1200, 1100, 60, 12), _counters(2100, 1950, 95, 12),
                _counters(2200, 2050, 100, 12, 160)]  # fmt: skip
    for last, now in itertools.pairwise(readings):
        _attribute(kills[: 1 + (now["env_steps"] > 1500) + (now["env_steps"] > 2000)], last, now)
    final = _counters(2600, 2300, 130, 12, 160)
    assert losses(kills, final) == [
        {"t": 10.0, "role": "learner", "updates_lost": 12, "replay_transitions_lost": 0,
         "env_steps_not_written": 500 - 480, "env_steps_after": 500, "updates_after": 20},
        {"t": 20.0, "role": "shard", "updates_lost": 0, "replay_transitions_lost": 160,
         "env_steps_not_written": 500 - 520, "env_steps_after": 500, "updates_after": 20},
        {"t": 30.0, "role": "actor", "updates_lost": 0, "replay_transitions_lost": 0,
         "env_steps_not_written": 600 - 400, "env_steps_after": 600, "updates_after": 40},
    ]  # fmt: skip
    assert losses([], final) == []


@pytest.mark.parametrize(
    "beats, missing",
    [
        ({"actor-0": 101.0, "actor-1": 105.0, "learner": 100.5}, []),  # all after the kill
        ({"actor-0": 101.0, "actor-1": 99.0, "learner": 100.5}, ["actor-1"]),  # not restarted
        ({"actor-0": 101.0, "learner": 100.0}, ["actor-1", "learner"]),  # gone; at the kill
        ({"actor-0": 101.0, "actor-1": 102.0, "learner": 103.0, "actor-2": 50.0}, []),  # new
    ],
)
def test_the_wait_names_the_roles_without_a_heartbeat_since_the_last_kill(
    redis_url, beats, missing
):
    client = redis.Redis.from_url(redis_url)
    keys = RedisKeys("chaos-test")
    client.hset(keys.heartbeats, mapping=beats)
    roles = {"actor-0", "actor-1", "learner"}  # heartbeats before the first kill; last kill: 100
    assert _wait_for_heartbeats(client, keys, roles, since=100.0, timeout_s=0) == missing
    client.close()
