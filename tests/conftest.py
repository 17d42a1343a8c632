"""Shared fixtures: a real redis-server on a free loopback port; the parallel test groups."""

import os

# Two pytest-xdist workers share two cores, so each test process (and every process it starts:
# a `mario train`, Ray's workers) runs torch and OpenMP on one thread. At torch's default (one
# per core) a serial training test beside a busy core ran 2-4x slower (2026-11-26: 68 s against
# 28 s with `yes` on the other core; 146 s in a full suite against 11 s alone).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import redis

from common.redis_io import EmbeddedRedis


@pytest.fixture(scope="session")
def redis_server():
    server = EmbeddedRedis()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


# Test files run in parallel (pytest-xdist --dist loadgroup), each file a group of its own, so
# that its module-scoped fixtures (a short training run) are built once. The files that start
# Ray clusters share one group, queued first: it is the suite's longest unit (2026-11-26 13:16,
# clean-clone CI: compose 211 s, distributed 196 s, multi-node 141 s, chaos 97 s, of the
# suite's 656 s). Split into two groups (one cluster per worker) the suite took 600 and 623 s,
# but a Ray node's `ray start` timed out registering (Ray waits 30 s) in one run and a
# restarted actor came after the chaos round in the other: flaky.
SHARED_GROUPS = dict.fromkeys(
    ("test_distributed.py", "test_chaos.py", "test_compose_processes.py", "test_ray_multinode.py"),
    "ray-clusters",
)
# The longest of the other files (in that order in the same run): queued after the Ray group, so
# that what is left when a worker asks for more work is short (longest first). pyproject.toml's
# --no-loadscope-reorder keeps this order (xdist's default sorts groups by their test count).
LONG_FILES = (
    "test_serial_train.py",
    "test_scripted_1_1.py",
    "test_shard_worker.py",
    "test_mario_env.py",
    "test_learning.py",
    "test_reaper.py",
    "test_shard.py",
)


def _queue_position(item) -> int:
    name = item.path.name
    if name in SHARED_GROUPS:
        return 0
    return 1 + LONG_FILES.index(name) if name in LONG_FILES else 1 + len(LONG_FILES)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's hook, which reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        group = SHARED_GROUPS.get(item.path.name, str(item.path))
        item.add_marker(pytest.mark.xdist_group(group))
    items.sort(key=_queue_position)  # stable: a file's tests keep their order
