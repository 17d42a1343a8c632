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


# Files that start Ray clusters (or processes whose leftovers they look for by name) run one
# after another on one pytest-xdist worker; every other file is a group of its own, so its
# module-scoped fixtures (a short training run) are built once.
SERIAL_GROUP_FILES = frozenset({
    "test_distributed.py", "test_chaos.py", "test_compose_processes.py", "test_ray_multinode.py",
})  # fmt: skip


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's hook, which reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        name = item.path.name
        group = "ray-clusters" if name in SERIAL_GROUP_FILES else str(item.path)
        item.add_marker(pytest.mark.xdist_group(group))
