"""What the Ray backend's evaluator plays, read from a real redis-server as the learner published
it: the average of the weights when the learner keeps one (and the online net beside it with
--eval.compare-online), else the online net."""

import numpy as np
import pytest
import torch

from common.config import NetworkConfig
from common.networks import build_network
from common.redis_io import RedisEndpoint
from common.wire import WireError
from launch.bench.learner import synthetic_sample
from launch.ray_backend import weights_to_evaluate
from learner.learner import Learner, LearnerConfig
from learner.runner import AVERAGE_PUBLISH_EVERY, LearnerRunner


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_evaluator_plays_the_published_average_and_the_online_net_beside_it(redis_url):
    torch.manual_seed(0)
    endpoint = RedisEndpoint(redis_url, run_id="eval-weights")
    learner = Learner(LearnerConfig(device="cpu", ema_decay=0.5), NetworkConfig(), 5)
    runner = LearnerRunner(learner, replay=None, endpoint=endpoint)  # publishes both: version 0
    client, keys = endpoint.connect(), endpoint.keys
    expected = build_network(NetworkConfig(), 5, 4).state_dict()
    start = learner.cpu_weights()
    rng = np.random.default_rng(0)
    for _ in range(3):
        learner.update(synthetic_sample(rng, 8, num_actions=5))
    runner.publish()  # the weights at version 3; the average waits for its AVERAGE_PUBLISH_EVERY
    assert AVERAGE_PUBLISH_EVERY > 1
    weights, version, online = weights_to_evaluate(client, keys, expected, True, True)
    assert version == 0 and _same(weights, start)  # the last published average: the first
    assert _same(online, learner.cpu_weights())  # the online net as last published (version 3)
    runner.publish(last=True)  # the learner's last publish carries the average too
    weights, version, online = weights_to_evaluate(client, keys, expected, True, True)
    assert version == 3 and _same(weights, learner.cpu_weights("ema"))
    assert not _same(weights, online) and _same(online, learner.cpu_weights())
    assert weights_to_evaluate(client, keys, expected, True, False)[2] is None
    # a learner without an average: the online net
    weights, version, online = weights_to_evaluate(client, keys, expected, False, False)
    assert version == 3 and _same(weights, learner.cpu_weights()) and online is None


def test_a_missing_average_fails_the_round_by_name(redis_url):
    endpoint = RedisEndpoint(redis_url, run_id="no-average")
    LearnerRunner(Learner(LearnerConfig(device="cpu"), NetworkConfig(), 5), None, endpoint)
    expected = build_network(NetworkConfig(), 5, 4).state_dict()
    with pytest.raises(WireError, match="message must be bytes, got NoneType"):
        weights_to_evaluate(endpoint.connect(), endpoint.keys, expected, True, False)
