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
# Ray clusters share one group: two clusters at once on 2 cores slowed each test twofold and
# timed one out (2026-11-26).
SHARED_GROUPS = dict.fromkeys(
    ("test_distributed.py", "test_chaos.py", "test_compose_processes.py", "test_ray_multinode.py"),
    "ray-clusters",
)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's hook, which reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        group = SHARED_GROUPS.get(item.path.name, str(item.path))
        item.add_marker(pytest.mark.xdist_group(group))
    # The Ray group is the longest unit of work (about 11 of the suite's 12 minutes in one
    # worker): queued first, it starts at once instead of after the files sorted before it.
    items.sort(key=lambda item: item.path.name not in SHARED_GROUPS)
