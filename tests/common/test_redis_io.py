"""The embedded redis-server: persistence across a kill, restart on the same port, and role
clients that ride out the outage while a driver's client fails fast."""

import os
import signal
import threading
import time

import pytest
import redis
from redis.backoff import NoBackoff

from common.redis_io import EmbeddedRedis, OutageRetry, connect


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


@pytest.mark.parametrize(
    ("errors", "calls", "outcome"),
    [
        ([], 1, "ok"),
        ([redis.ConnectionError("lost")] * 2, 3, "ok"),  # a lost connection is retried
        ([redis.TimeoutError("slow")] * 5, 4, redis.TimeoutError),  # 3 retries, then it gives up
        ([redis.AuthenticationError("invalid password")], 1, redis.AuthenticationError),
        ([redis.ConnectionError("lost"), redis.AuthenticationError("no")], 2,
         redis.AuthenticationError),
    ],
)  # fmt: skip
def test_outage_retry_retries_lost_connections_not_refusals(errors, calls, outcome):
    retry = OutageRetry(NoBackoff(), 3)
    pending, made = list(errors), []

    def do():
        made.append(1)
        if pending:
            raise pending.pop(0)
        return "ok"

    if outcome == "ok":
        assert retry.call_with_retry(do, lambda error: None) == "ok"
    else:
        with pytest.raises(outcome):
            retry.call_with_retry(do, lambda error: None)
    assert len(made) == calls


def test_a_wrong_password_fails_at_once_even_with_an_outage_window():
    with EmbeddedRedis(password="s3cret") as server:
        client = connect(server.url, outage_s=90)  # would retry a lost connection for ~90 s
        with pytest.raises(redis.AuthenticationError):
            client.ping()
        assert isinstance(client.get_retry(), OutageRetry)  # the window is there; refusals skip it
