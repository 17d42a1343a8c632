"""Replay shard on a real redis-server: ingest, ack-after-insert, pending recovery, fuzz."""

import numpy as np
import pytest
import redis

from common.experience import synthetic_chunk
from common.redis_io import REPLAY_GROUP, RedisConfig, RedisEndpoint, RedisKeys, connect
from common.wire import encode_chunk
from replay_server.replay import PrioritizedReplay, ReplayConfig
from replay_server.shard import ReplayShard
from tests.common.reply_dropper import ReplyDropper

RUN = "test-run"
# samples_per_insert ≈ 0: the rate limiter never holds inserts back (no learner here)
CONFIG = ReplayConfig(capacity=5000, min_size_to_sample=10, samples_per_insert=1e-6)


def make_shard(url, shard_id=0, redis_config=None):
    endpoint = RedisEndpoint(url, RUN, redis_config or RedisConfig())
    replay = PrioritizedReplay(CONFIG, stack=4)
    return ReplayShard(replay, endpoint, shard_id=shard_id, stack=4, num_actions=5)


def write_chunks(client, count, rng, length=20):
    keys = RedisKeys(RUN)
    for _ in range(count):
        message = encode_chunk(synthetic_chunk(rng, length), RUN)
        client.xadd(keys.experience, {b"c": message})
        client.hincrby(keys.counters, "chunks_written", 1)


def drain(shard):
    total = 0
    while True:
        read = shard.ingest(max_chunks=16)
        if read == 0:
            return total
        total += read


def test_ingest_inserts_acks_and_trims(redis_url):
    client = redis.Redis.from_url(redis_url)
    shard = make_shard(redis_url)
    write_chunks(client, 10, np.random.default_rng(0))
    assert drain(shard) == 10
    assert shard.replay.size == 200
    keys = RedisKeys(RUN)
    assert client.xpending(keys.experience, REPLAY_GROUP)["pending"] == 0
    shard._last_trim = 0
    shard._maybe_trim()
    assert client.xlen(keys.experience) == 0  # consumed entries are trimmed: XLEN = backlog
    assert int(client.hget(keys.counters, "chunks_inserted")) == 10
    sample = shard.sample(32)
    assert sample is not None and sample.obs.shape == (32, 4, 84, 84)


def test_restarted_shard_reads_its_pending_entries_first(redis_url):
    client = redis.Redis.from_url(redis_url)
    keys = RedisKeys(RUN)
    make_shard(redis_url)  # creates the group
    write_chunks(client, 6, np.random.default_rng(1))
    # A shard that read 4 entries and died before acking: they stay pending under its name.
    client.xreadgroup(REPLAY_GROUP, "shard-0", {keys.experience: ">"}, count=4)
    assert client.xpending(keys.experience, REPLAY_GROUP)["pending"] == 4
    successor = make_shard(redis_url)
    assert drain(successor) == 6  # 4 pending + 2 new, none lost, none twice
    counters = client.hgetall(keys.counters)
    assert int(counters[b"chunks_inserted"]) == int(counters[b"chunks_written"]) == 6
    assert successor.replay.size == 120


def test_fuzzed_stream_never_crashes_the_shard_and_every_reject_is_counted(redis_url):
    client = redis.Redis.from_url(redis_url)
    keys = RedisKeys(RUN)
    shard = make_shard(redis_url)
    rng = np.random.default_rng(2)
    good = encode_chunk(synthetic_chunk(rng, 10), RUN)
    bad = 0
    pipe = client.pipeline(transaction=False)
    for trial in range(3000):
        kind = trial % 4
        if kind == 0:
            fields = {b"c": rng.integers(0, 256, rng.integers(0, 300), dtype=np.uint8).tobytes()}
        elif kind == 1:
            fields = {b"c": good[: int(rng.integers(0, len(good)))]}
        elif kind == 2:
            corrupt = bytearray(good)
            corrupt[int(rng.integers(0, 60))] ^= 0xFF  # inside the magic/header
            fields = {b"c": bytes(corrupt)}
        else:
            fields = {b"other": b"field"}
        pipe.xadd(keys.experience, fields)
        bad += 1
    pipe.execute()
    write_chunks(client, 5, rng)
    drain(shard)
    counters = client.hgetall(keys.counters)
    assert int(counters[b"chunks_inserted"]) == 5
    assert int(counters[b"chunks_rejected"]) == bad
    assert shard.replay.size == 100  # the good chunks went in, nothing was lost


def test_password_protected_redis(monkeypatch, tmp_path):
    from common.redis_io import EmbeddedRedis

    with EmbeddedRedis(password="s3cret") as server:
        with pytest.raises(redis.AuthenticationError):
            make_shard(server.url)  # no password: refused
        monkeypatch.setenv("MARIO_TEST_REDIS_PASSWORD", "s3cret")
        config = RedisConfig(password_env="MARIO_TEST_REDIS_PASSWORD")
        shard = make_shard(server.url, redis_config=config)
        client = redis.Redis.from_url(server.url, password="s3cret")
        write_chunks(client, 3, np.random.default_rng(4))
        assert drain(shard) == 3


def held_shard(redis_url, client, rng):
    """A shard whose learner is behind: its limiter took 100 transitions (5 chunks written and
    taken in here) and now holds inserts back."""
    held = ReplayConfig(capacity=5000, min_size_to_sample=20, samples_per_insert=8,
                        rate_error_buffer=1)  # fmt: skip
    endpoint = RedisEndpoint(redis_url, RUN, RedisConfig())
    shard = ReplayShard(PrioritizedReplay(held, stack=4), endpoint, shard_id=0, stack=4,
                        num_actions=5)  # fmt: skip
    write_chunks(client, 5, rng)
    assert drain(shard) == 5 and not shard.replay.can_insert(1)
    return shard


def test_junk_waiting_behind_a_full_rate_limiter_is_deleted_not_counted_as_backlog(redis_url):
    client, keys, rng = redis.Redis.from_url(redis_url), RedisKeys(RUN), np.random.default_rng(4)
    shard = held_shard(redis_url, client, rng)
    good = encode_chunk(synthetic_chunk(rng, 20), RUN)
    for index in range(40):  # junk among valid chunks, all waiting
        client.xadd(keys.experience, {b"c": good if index % 4 == 0 else good[:-index]})
    client.xadd(keys.experience, {b"other": b"field"})
    assert client.xlen(keys.experience) == 41  # 10 valid chunks and 31 malformed entries wait
    for _ in range(4):
        assert shard.ingest(max_chunks=16) == 0  # nothing inserted while the limiter holds
    shard._last_trim = 0
    shard._maybe_trim()
    assert client.xlen(keys.experience) == 10  # only the valid chunks wait
    assert int(client.hget(keys.counters, "chunks_rejected")) == 31
    # Screened entries are not screened again, and once the learner catches up they go in.
    shard.replay.limiter.samples += 10_000
    assert drain(shard) == 10 and int(client.hget(keys.counters, "chunks_inserted")) == 15


def test_acks_whose_reply_was_lost_are_counted_once(redis_server, redis_url):
    dropper = ReplyDropper(redis_server.port)
    try:
        client, keys = redis.Redis.from_url(redis_url), RedisKeys(RUN)
        shard = make_shard(dropper.url)  # its client retries the lost answer by itself
        write_chunks(client, 3, np.random.default_rng(0))
        assert drain(shard) == 3  # loads the script
        write_chunks(client, 4, np.random.default_rng(1))
        dropper.arm(b":acks\r\n")
        assert drain(shard) == 4
        assert dropper.dropped == 1 and shard._acks.replayed == 1
        assert int(client.hget(keys.counters, "chunks_inserted")) == 7 == shard.replay.size // 20
        assert client.xpending(keys.experience, REPLAY_GROUP)["pending"] == 0
    finally:
        dropper.close()


def test_entries_whose_read_reply_was_lost_are_read_again_not_left_pending(redis_server,
                                                                           redis_url):  # fmt: skip
    # Redis delivers new entries to the shard (XREADGROUP ">") and the reply is lost; the
    # client's retry reads nothing new. Those entries stayed pending for ever: never inserted,
    # never acked or trimmed, a backlog growing until it held every actor back.
    dropper = ReplyDropper(redis_server.port)
    try:
        client, keys = redis.Redis.from_url(redis_url), RedisKeys(RUN)
        shard = make_shard(dropper.url)
        write_chunks(client, 3, np.random.default_rng(0))
        assert drain(shard) == 3
        write_chunks(client, 4, np.random.default_rng(1))
        dropper.arm(b"$1\r\n>\r\n")  # the id argument of a read of new entries
        assert shard.ingest(max_chunks=16) == 0  # the retry found nothing new
        assert dropper.dropped == 1
        assert client.xpending(keys.experience, REPLAY_GROUP)["pending"] == 4
        shard._last_trim = 0
        assert shard.ingest(max_chunks=16) == 0  # its once-a-second check finds them
        assert drain(shard) == 4  # and the next reads take them in
        assert int(client.hget(keys.counters, "chunks_inserted")) == 7 == shard.replay.size // 20
        assert client.xpending(keys.experience, REPLAY_GROUP)["pending"] == 0
    finally:
        dropper.close()


def test_entries_taken_in_whose_ack_was_dropped_are_acked_not_inserted_twice(redis_url):
    # The ack batch is dropped on an answer other than a lost connection (MISCONF, READONLY):
    # the entries are in the replay and still pending. The pending check reads them again:
    # they are acked, not inserted a second time.
    client, keys = redis.Redis.from_url(redis_url), RedisKeys(RUN)
    shard = make_shard(redis_url)
    write_chunks(client, 3, np.random.default_rng(0))
    send = shard._acks.write
    shard._acks.write = lambda batch: batch()  # each batch is made, and lost
    for _ in range(5):  # taken in once, however often the pending check reads them again
        shard.ingest(max_chunks=16)
        shard._last_trim = 0
    assert shard.replay.size == 3 * 20  # (without the check of ids taken: every ingest added 3)
    assert client.xpending(keys.experience, REPLAY_GROUP)["pending"] == 3
    shard._acks.write = send  # the acks go through again
    for _ in range(3):
        shard.ingest(max_chunks=16)
        shard._last_trim = 0
    assert shard.replay.size == 3 * 20
    assert client.xpending(keys.experience, REPLAY_GROUP)["pending"] == 0


def test_acks_a_long_outage_held_back_are_sent_and_none_is_lost(redis_server, redis_url,
                                                                 monkeypatch):  # fmt: skip
    # a client without retries: each lost request stands for an outage longer than the window
    monkeypatch.setattr(RedisEndpoint, "connect",
                        lambda self, outage_s=0: connect(self.url, self.config, 0))  # fmt: skip
    dropper = ReplyDropper(redis_server.port)
    try:
        client, keys = redis.Redis.from_url(redis_url), RedisKeys(RUN)
        shard = make_shard(dropper.url)
        write_chunks(client, 3, np.random.default_rng(0))
        dropper.arm(b":acks\r\n", request=True)
        with pytest.raises(redis.ConnectionError):
            shard.ingest(max_chunks=16)  # inserted, not acked
        write_chunks(client, 4, np.random.default_rng(1))
        dropper.arm(b":acks\r\n", request=True)
        with pytest.raises(redis.ConnectionError):
            shard.ingest(max_chunks=16)  # the held-back acks fail again: nothing new is read
        assert shard.replay.size == 3 * 20
        assert drain(shard) == 4  # the held-back acks, then the new chunks
        assert int(client.hget(keys.counters, "chunks_inserted")) == 7 == shard.replay.size // 20
        assert client.xpending(keys.experience, REPLAY_GROUP)["pending"] == 0
    finally:
        dropper.close()


def test_a_restarted_shard_counts_what_its_snapshot_had_not_taken_in(redis_url, tmp_path):
    client, keys = redis.Redis.from_url(redis_url), RedisKeys(RUN)
    shard = make_shard(redis_url)
    write_chunks(client, 3, np.random.default_rng(0))
    assert drain(shard) == 3
    shard.replay.snapshot(tmp_path / "replay-0.npz")  # 60 transitions in the snapshot
    write_chunks(client, 2, np.random.default_rng(1))
    assert drain(shard) == 2  # 40 more, then the shard dies
    for expected_lost, lost_in_all in ((40, 40), (0, 40)):  # the second restart loses nothing
        restarted = make_shard(redis_url)
        assert restarted.restore(tmp_path / "replay-0.npz") == expected_lost
        assert restarted.replay.size == 60
        assert int(client.hget(keys.counters, "replay_transitions_lost")) == lost_in_all
    assert make_shard(redis_url, shard_id=1).restore(None) == 0  # a first start loses nothing
    restarted = make_shard(redis_url)  # no snapshot (lost): all the 60 it had are lost
    assert restarted.restore(None) == 60 and restarted.replay.size == 0


def test_the_shutdown_drain_takes_in_what_waits_behind_the_rate_limiter(redis_url):
    """At shutdown the learner has stopped: what the actors flushed goes into the replay (and
    so into its snapshot) whatever the limiter says, rather than stay in a Redis that an
    embedded server empties on the next start."""
    client, keys, rng = redis.Redis.from_url(redis_url), RedisKeys(RUN), np.random.default_rng(5)
    shard = held_shard(redis_url, client, rng)
    write_chunks(client, 7, rng)  # the actors' last chunks
    assert shard.ingest(max_chunks=16) == 0  # held back while a learner could still sample
    assert shard.ingest(max_chunks=4, limit=False) == 4
    assert shard.ingest(max_chunks=16, limit=False) == 3
    assert shard.replay.size == 12 * 20
    assert int(client.hget(keys.counters, "chunks_inserted")) == 12
    assert client.xpending(keys.experience, REPLAY_GROUP)["pending"] == 0
    shard.finish()  # the last trim, at once: XLEN is what no shard took in (the chunk books)
    assert client.xlen(keys.experience) == 0
