"""`mario bench feed`: real replay shards (filled through Redis) serve a learner's client through
Ray; one row per configuration, and bad settings are named."""

import json
import time

import pytest

from launch.bench.feed import BenchFeedConfig
from launch.cli import main


def test_bench_feed_measures_every_configuration(tmp_path, capsys):
    out = tmp_path / "feed.json"
    main(["bench", "feed", "--shards", "1", "2", "--batch-sizes", "8", "16", "--prefetch", "2",
          "--batches-per-request", "1", "3", "--transitions-per-shard", "500", "--seconds", "0.3",
          "--out", str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    measured = {(row["shards"], row["batch_size"], row["prefetch"], row["batches_per_request"])
                for row in result["rows"]}  # fmt: skip
    assert measured == {(shards, batch, 2, per_request) for shards in (1, 2) for batch in (8, 16)
                        for per_request in (1, 3)}  # fmt: skip
    for row in result["rows"]:
        assert row["batches_per_s"] > 0
        assert row["samples_per_s"] == pytest.approx(row["batches_per_s"] * row["batch_size"])
    # every shard held its share, was sampled and took the learner's priorities back
    for count, shards in result["shards_after"].items():
        assert len(shards) == int(count)
        for shard in shards:
            assert shard["size"] == 500 and shard["sampled"] > 0 and shard["priority_updates"] > 0
    assert "batches/s" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shards": ()}, "shards () must be one or more numbers >= 1"),
        ({"prefetch": (0,)}, "prefetch (0,) must be one or more numbers >= 1"),
        ({"batches_per_request": (2, 0)},
         "batches_per_request (2, 0) must be one or more numbers >= 1"),
        ({"batch_sizes": (256,), "transitions_per_shard": 200},
         "transitions_per_shard (200) must be >= 256"),
        ({"seconds": 0}, "seconds (0) must be > 0"),
    ],
)  # fmt: skip
def test_bad_feed_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        BenchFeedConfig(**kwargs)


def test_priorities_held_for_a_request_of_several_batches_reach_the_shard_on_flush(
    redis_url, tmp_path
):
    # A real ShardWorker filled through Redis, the learner's client asking 3 batches a request:
    # the priorities of 2 batches wait for the third, and flush() (the learner stops) sends them.
    import dataclasses

    import numpy as np
    import ray

    from common.redis_io import RedisEndpoint
    from launch.bench.feed import _fill, _stats, _wait_filled
    from launch.ray_backend import RayReplayClient, ShardWorker
    from launch.roles import ReplaySpec
    from replay_server.replay import ReplayConfig

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False,
             configure_logging=False)  # fmt: skip
    try:
        replay = ReplayConfig(capacity=500, min_size_to_sample=16, rate_error_buffer=1e15)
        spec = ReplaySpec(shard_id=0, replay=replay, stack=4, num_actions=5, seed=0)
        endpoint = RedisEndpoint(redis_url, run_id="flush")
        shard = ShardWorker.remote(dataclasses.replace(spec), endpoint, str(tmp_path / "none"),
                                   str(tmp_path))  # fmt: skip
        _fill(endpoint, 500)
        _wait_filled([shard], 500)
        client = RayReplayClient([shard], prefetch=1, batches_per_request=3)
        drawn = []
        while len(drawn) < 2:
            item = client.next_sample(16)
            if item is not None:
                drawn.append(item)
        assert len(client.ready) == 1  # the request's third batch, waiting for the learner
        for shard_id, sample in drawn:
            client.update_priorities(shard_id, sample.keys, np.full(16, 2.0))
        assert _stats([shard])[0]["replay/priority_updates"] == 0  # held for the third batch
        client.flush()
        ray.get(list(client.inflight))
        for _ in range(100):  # fire and forget (a threaded actor): give the call a moment
            if _stats([shard])[0]["replay/priority_updates"] == 32:
                break
            time.sleep(0.05)
        assert _stats([shard])[0]["replay/priority_updates"] == 32
    finally:
        ray.shutdown()


def test_the_learner_draws_from_each_shard_in_proportion_to_its_total_priority(redis_url, tmp_path):
    # Two real ShardWorkers, one holding 3x the other's transitions: shard totals near 1 : 3.
    # The client picks a shard per request in proportion to the totals the shards report, and
    # each shard samples its items by priority (the replay's tests), so an item's chance is its
    # priority over the sum of all shards'. Of 400 batches, shard 1 should give its share of
    # the total (binomial sd about 2.2 points; the client's draws are seeded).
    import dataclasses

    import ray

    from common.redis_io import RedisEndpoint
    from launch.bench.feed import _fill, _stats, _wait_filled
    from launch.ray_backend import RayReplayClient, ShardWorker
    from launch.roles import ReplaySpec
    from replay_server.replay import ReplayConfig

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False,
             configure_logging=False)  # fmt: skip
    try:
        replay = ReplayConfig(capacity=1000, min_size_to_sample=16, rate_error_buffer=1e15)
        spec = ReplaySpec(shard_id=0, replay=replay, stack=4, num_actions=5, seed=0)
        held = (300, 900)  # whole chunks of 100
        endpoints = [RedisEndpoint(redis_url, run_id=f"share-{i}") for i in range(2)]
        shards = [ShardWorker.remote(dataclasses.replace(spec, shard_id=i, seed=i), endpoints[i],
                                     str(tmp_path / "none"), str(tmp_path))
                  for i in range(2)]  # fmt: skip
        for endpoint, transitions in zip(endpoints, held, strict=True):
            _fill(endpoint, transitions)
        _wait_filled(shards, min(held))
        _wait_filled(shards[1:], max(held))
        client = RayReplayClient(shards, prefetch=2, seed=0)
        drawn = []
        while len(drawn) < 400:
            item = client.next_sample(16)
            if item is not None:
                drawn.append(item[0])
        ray.get(list(client.inflight))
        own = [ray.get(shard.sample.remote(16, 0))[1] for shard in shards]  # totals, no batch
        assert list(client.totals) == pytest.approx(own)  # what the shards reported
        share = own[1] / sum(own)  # near 0.75: actors' initial priorities differ per item
        assert 0.65 < share < 0.85
        assert sum(drawn) / len(drawn) == pytest.approx(share, abs=0.07)
        assert [s["replay/size"] for s in _stats(shards)] == list(held)
    finally:
        ray.shutdown()


@pytest.mark.parametrize(
    ("totals", "weights"),
    [
        ([1.0, 1.0], [0.5, 0.5]),  # before any shard reported
        ([300.0, 900.0], [0.25, 0.75]),  # in proportion to the total priority
        # a shard that reported an empty replay (restarted without a snapshot, or at the
        # start) is asked as often as the average shard with data: it once got 1e-9 of the
        # requests and was never asked again, its share of the stream lost to training
        ([0.0, 600.0, 1200.0], [900 / 2700, 600 / 2700, 1200 / 2700]),
        ([0.0, 0.0], [0.5, 0.5]),
    ],
)
def test_a_shard_is_asked_in_proportion_to_its_total_and_an_empty_one_is_not_forgotten(
    totals, weights
):
    from launch.ray_backend import shard_weights

    assert list(shard_weights(totals)) == pytest.approx(weights)
