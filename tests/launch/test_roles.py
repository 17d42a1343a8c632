"""Role specs: what each role is built from."""

import pytest

from launch.config import DistributedConfig, TrainConfig
from launch.roles import RoleSpecs
from replay_server.replay import ReplayConfig


@pytest.mark.parametrize(
    ("shards", "anneal", "per_shard"), [(1, 1000, 1000), (4, 1000, 250), (3, 1000, 333), (4, 2, 1)]
)
def test_each_shard_anneals_beta_over_its_share_of_the_runs_samples(shards, anneal, per_shard):
    config = TrainConfig(
        distributed=DistributedConfig(num_shards=shards),
        replay=ReplayConfig(beta_anneal_samples=anneal),
    )
    specs = RoleSpecs(config)
    for shard_id in range(shards):
        spec = specs.replay(shard_id)
        assert spec.shard_id == shard_id
        assert spec.replay.beta_anneal_samples == per_shard
        assert spec.replay.capacity == config.replay.capacity  # each shard holds a full one
