"""Shared fixtures: a real redis-server on a free loopback port; the parallel test groups."""

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
