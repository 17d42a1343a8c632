"""The embedded redis-server: persistence across a kill, restart on the same port, and role
clients that ride out the outage while a driver's client fails fast."""

import os
import signal
import threading
import time

import pytest
import redis

from common.redis_io import EmbeddedRedis, connect


def test_a_killed_persistent_server_restarts_with_what_it_acknowledged(tmp_path):
    data_dir = tmp_path / "redis"
    (data_dir / "stale").mkdir(parents=True)  # an earlier start's data is not this one's
    server = EmbeddedRedis(data_dir=data_dir)
    try:
        assert not (data_dir / "stale").exists()
        client = connect(server.url, outage_s=30)
        for index in range(50):
            client.xadd("stream", {"i": index})
        client.hincrby("counters", "written", 50)
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait()
        fast = connect(server.url)  # no retries: fails at once while the server is down
        with pytest.raises(redis.ConnectionError):
            fast.ping()
        # A role's command issued during the outage waits and succeeds after the restart.
        result = {}
        worker = threading.Thread(target=lambda: result.update(n=client.xlen("stream")))
        worker.start()
        time.sleep(1.0)
        assert server.restart_if_dead() and not server.restart_if_dead()
        worker.join(timeout=30)
        assert result == {"n": 50}
        assert int(client.hget("counters", "written")) == 50 and server.restarts == 1
    finally:
        server.stop()
    assert not data_dir.exists()  # its data served restarts within this start only


def test_an_in_memory_server_restarts_empty():
    server = EmbeddedRedis()
    try:
        client = connect(server.url, outage_s=30)
        client.set("key", "value")
        server.process.kill()
        server.process.wait()
        assert server.restart_if_dead()
        assert client.get("key") is None
    finally:
        server.stop()
