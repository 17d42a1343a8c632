"""The embedded redis-server: persistence across a kill, restart on the same port, and role
clients that ride out the outage while a driver's client fails fast."""

import os
import signal
import threading
import time

import pytest
import redis
from redis.backoff import NoBackoff

from common.redis_io import EmbeddedRedis, OnceWriter, OutageRetry, RedisKeys, connect
from tests.common.reply_dropper import ReplyDropper


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
        admin = redis.Redis.from_url(server.url, password="s3cret")
        before = admin.info("stats")["total_connections_received"]
        client = connect(server.url, outage_s=90)  # would retry a lost connection for ~90 s
        with pytest.raises(redis.AuthenticationError):
            client.ping()
        assert isinstance(client.get_retry(), OutageRetry)  # the window is there; refusals skip it
        # one refused connection, not a retry loop (counted by the server, not timed)
        assert admin.info("stats")["total_connections_received"] - before == 1


def _stream_batch(index):
    return [("XADD", "stream", "*", "i", index), ("HINCRBY", "counters", "written", 1)], index


def test_a_batch_whose_reply_was_lost_is_applied_once(redis_server, redis_url):
    dropper = ReplyDropper(redis_server.port)
    try:
        client, check = connect(dropper.url), redis.Redis.from_url(redis_url)
        writer = OnceWriter(client, RedisKeys("once"), "actor-0:abc:chunks")
        assert writer.write(lambda: _stream_batch(0)) == 0  # loads the script too
        dropper.arm(b"actor-0:abc:chunks")
        with pytest.raises(redis.ConnectionError):
            writer.write(lambda: _stream_batch(1))
        assert dropper.dropped == 1 and writer.busy and writer.pending == 1
        assert check.xlen("stream") == 2  # Redis applied it: only the answer was lost
        # the retry sends the same batch (build is not called) and Redis skips it
        assert writer.write(lambda: pytest.fail("built a new batch")) == 1
        assert not writer.busy and writer.replayed == 1
        assert writer.write(lambda: _stream_batch(2)) == 2
        assert check.xlen("stream") == 3 and int(check.hget("counters", "written")) == 3
        assert [int(f[b"i"]) for _, f in check.xrange("stream")] == [0, 1, 2]
        # a MULTI/EXEC sent again after the same loss counts twice: why the writer exists
        dropper.arm(b"MULTI")
        pipe = client.pipeline(transaction=True)
        pipe.hincrby("counters", "written", 1)
        with pytest.raises(redis.ConnectionError):
            pipe.execute()
        pipe.hincrby("counters", "written", 1)
        pipe.execute()
        assert int(check.hget("counters", "written")) == 5
    finally:
        dropper.close()


def test_each_producer_counts_its_own_batches(redis_url):
    client = connect(redis_url)
    first = OnceWriter(client, RedisKeys("once"), "actor-0:aaa:records")
    again = OnceWriter(client, RedisKeys("once"), "actor-0:aaa:records")  # same name: skipped
    restarted = OnceWriter(client, RedisKeys("once"), "actor-0:bbb:records")  # a new process
    for writer, applied in ((first, 1), (again, 1), (restarted, 2)):
        writer.write(lambda: _stream_batch(0))
        assert client.xlen("stream") == applied
    assert (first.replayed, again.replayed, restarted.replayed) == (0, 1, 0)
    assert client.hgetall(RedisKeys("once").producers) == {
        b"actor-0:aaa:records": b"1", b"actor-0:bbb:records": b"1"}  # fmt: skip


def test_a_batch_lost_with_the_server_is_sent_again_to_the_new_one(tmp_path):
    server = EmbeddedRedis()  # in memory: a restart loses everything, the batch included
    try:
        client = connect(server.url)
        writer = OnceWriter(client, RedisKeys("once"), "actor-0:abc:counts")
        writer.write(lambda: _stream_batch(0))
        server.process.kill()
        server.process.wait()
        with pytest.raises(redis.ConnectionError):
            writer.write(lambda: _stream_batch(1))
        assert server.restart_if_dead()
        assert writer.write(lambda: pytest.fail("built a new batch")) == 1
        assert client.xlen("stream") == 1 and writer.replayed == 0
    finally:
        server.stop()


def test_a_batch_redis_refuses_is_dropped_not_sent_for_ever(redis_url):
    client = connect(redis_url)
    client.set("stream", "not a stream")
    writer = OnceWriter(client, RedisKeys("once"), "actor-0:abc:chunks")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        writer.write(lambda: _stream_batch(0))
    assert not writer.busy and writer.write(lambda: ([("SET", "k", "v")], "next")) == "next"


def test_the_data_of_a_run_is_every_key_it_writes_but_its_driver_lease():
    keys = RedisKeys("run-x")
    named = {name for name, value in vars(RedisKeys).items() if isinstance(value, property)}
    assert named - {"driver", "data"} == {
        "experience", "weights", "ema_weights", "weights_version", "telemetry", "counters",
        "heartbeats", "stats", "shards", "producers",
    }  # fmt: skip
    assert sorted(keys.data) == sorted(f"mario:run-x:{name}" for name in named - {"driver", "data"})
