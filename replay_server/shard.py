"""A replay shard: a PrioritizedReplay fed from the run's Redis stream through a consumer group.

Delivery guarantee: an entry is XACKed only after its chunk is inserted (or counted as
rejected), in one atomic step with the counters (an OnceWriter batch, applied once even if its
answer is lost and the client sends it again). A shard that dies between reading and acking
leaves the entries pending under its consumer name; its successor (same name) reads its own
pending entries first. So every chunk that reached Redis ends up inserted or rejected, and
`written == inserted + rejected + still in the stream` holds across restarts.
"""

from __future__ import annotations

import collections
import logging
import pathlib
import time
import uuid

import numpy as np
import redis

from common.redis_io import REPLAY_GROUP, OnceWriter, RedisEndpoint
from common.wire import WireError, decode_chunk
from replay_server.replay import PrioritizedReplay, Sample

logger = logging.getLogger("replay_shard")
CHUNK_FIELD = b"c"
# Deletes a malformed waiting entry and counts it as rejected, in one step: sent again after a
# lost answer, the XDEL finds nothing and nothing is counted twice.
_DELETE_AND_COUNT = """
if redis.call('XDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[2], 'chunks_rejected', 1)
return 1
"""


TAKEN_IDS_KEPT = 10_000  # stream ids a shard remembers taking in: 10x the chunks the default
# replay holds (100,000 transitions in chunks of 100); about 1 MB


class _RecentIds:
    """A set of the last `size` ids added."""

    def __init__(self, size: int):
        self.size, self._order, self._ids = size, collections.deque(), set()

    def add(self, entry_id) -> None:
        if entry_id in self._ids:
            return
        self._order.append(entry_id)
        self._ids.add(entry_id)
        if len(self._order) > self.size:
            self._ids.discard(self._order.popleft())

    def __contains__(self, entry_id) -> bool:
        return entry_id in self._ids


class ReplayShard:
    """ingest() moves chunks from Redis into the replay; sample()/update_priorities() serve."""

    def __init__(
        self,
        replay: PrioritizedReplay,
        endpoint: RedisEndpoint,
        *,
        shard_id: int,
        stack: int,
        num_actions: int,
    ):
        self.shard_id = shard_id
        self.replay = replay
        self.client = endpoint.connect()
        self.redis_keys = endpoint.keys
        self.run_id = endpoint.run_id
        self.stack = stack
        self.num_actions = num_actions
        self.consumer = f"shard-{shard_id}"
        self._reading_own_pending = True
        self._last_trim = 0.0
        # Stream ids: the newest entry this shard read, and the newest it screened (_screen).
        self._read_to = self._screened_to = "0-0"
        # the acks and counts in one step, applied once even if a lost reply makes the client
        # send them again
        self._acks = OnceWriter(self.client, self.redis_keys,
                                f"{self.consumer}:{uuid.uuid4().hex[:12]}:acks")  # fmt: skip
        self._unacked: list = []  # ids inserted (or rejected) and not yet acked
        self._taken = _RecentIds(TAKEN_IDS_KEPT)  # ids this process took in, the newest
        self._uncounted = {"chunks_inserted": 0, "chunks_rejected": 0}
        self._delete_bad = self.client.register_script(_DELETE_AND_COUNT)
        self._inserted_field = f"{self.consumer}:transitions_inserted"
        self._create_group()

    def ingest(self, max_chunks: int = 32, block_ms: int | None = None, limit: bool = True) -> int:
        """Reads up to max_chunks entries, inserts them, acks them; returns how many were read.

        Reads nothing while the rate limiter holds inserts back (the learner is behind): the
        entries wait in Redis, where actors see the backlog. Meanwhile it screens them, so that
        only valid chunks count as backlog (see _screen). `limit=False` takes them in whatever
        the limiter says: the drain at shutdown, when no learner samples any more.
        """
        self.send_acks()  # what an earlier ingest could not ack, before reading more
        if limit and not self.replay.can_insert(1):
            self._screen(max_chunks)
            return 0
        entries = self._read("0", max_chunks, None) if self._reading_own_pending else []
        if entries:  # own pending entries: one this process took in already is acked, not
            # inserted again (its ack was dropped, e.g. a MISCONF or READONLY answer)
            again = [entry_id for entry_id, _ in entries if entry_id in self._taken]
            self._unacked += again
            entries = [(entry_id, fields) for entry_id, fields in entries
                       if entry_id not in self._taken]  # fmt: skip
        if not entries:
            self._reading_own_pending = False  # own pending list drained: read new entries
            entries = self._read(">", max_chunks, block_ms)
        ids, inserted, rejected = [], 0, 0
        for entry_id, fields in entries:
            ids.append(entry_id)
            self._taken.add(entry_id)
            self._read_to = max(self._read_to, _as_str(entry_id), key=_id_key)
            try:
                chunk = self._decode(fields)
                self.replay.insert(chunk)
                inserted += 1
            except (WireError, ValueError) as error:
                rejected += 1
                logger.warning("shard %d dropped entry %s: %s", self.shard_id, entry_id, error)
        self._unacked += ids  # in the replay now: acked (with their counts) even if this fails
        self._uncounted["chunks_inserted"] += inserted
        self._uncounted["chunks_rejected"] += rejected
        self.send_acks()
        self._maybe_trim()
        return len(ids)

    @property
    def rereading(self) -> bool:
        """Whether entries delivered to this shard wait to be read again (see
        _check_own_pending)."""
        return self._reading_own_pending

    def finish(self) -> None:
        """At shutdown: sends what is unacked and trims what every consumer is done with, so
        the stream holds only what no shard took in. A lost connection raises."""
        self.send_acks()
        self._maybe_trim(now_or_never=True)

    def send_acks(self) -> None:
        """Acks the entries taken in and adds them to the counters, in one OnceWriter batch
        (XACK in slices: Redis's Lua unpacks at most ~8,000 arguments). A lost connection raises
        and keeps them, for the next call."""
        self._acks.flush()
        if not self._unacked:
            return

        def batch():
            ids, counts = self._unacked, self._uncounted
            self._unacked, self._uncounted = [], dict.fromkeys(counts, 0)
            key = self.redis_keys.experience
            commands = [("XACK", key, REPLAY_GROUP, *ids[i : i + 1000])
                        for i in range(0, len(ids), 1000)]  # fmt: skip
            commands += [("HINCRBY", self.redis_keys.counters, name, value)
                         for name, value in counts.items()]  # fmt: skip
            commands.append(("HSET", self.redis_keys.shards, self._inserted_field,
                             self.replay.transitions_inserted))  # fmt: skip
            return commands, None

        self._acks.write(batch)

    def _decode(self, fields):
        if fields is None or CHUNK_FIELD not in fields:
            raise WireError("entry has no chunk field")
        return decode_chunk(fields[CHUNK_FIELD], self.run_id, self.stack, self.num_actions)

    def _screen(self, max_chunks: int) -> int:
        """Looks at waiting entries that no shard has read yet and deletes the malformed ones,
        counted as rejected: junk in the stream must not count as backlog, which holds actors
        back. Each entry is screened once (the valid ones are decoded again when ingested).
        Returns how many entries it deleted."""
        start = max(self._screened_to, self._read_to, key=_id_key)
        entries = self.client.xrange(self.redis_keys.experience, min=f"({start}", count=max_chunks)
        if entries:
            self._screened_to = _as_str(entries[-1][0])
            # only entries no shard was given yet: delivered ones are their reader's to judge
            delivered = "0-0"
            for group in self.client.xinfo_groups(self.redis_keys.experience):
                if _as_str(group["name"]) == REPLAY_GROUP:
                    delivered = _as_str(group.get("last-delivered-id", b"0-0"))
            entries = [(i, f) for i, f in entries if _id_key(_as_str(i)) > _id_key(delivered)]
        bad = []
        for entry_id, fields in entries:
            try:
                self._decode(fields)
            except (WireError, ValueError) as error:
                bad.append(entry_id)
                logger.warning("shard %d deleted waiting entry %s: %s", self.shard_id, entry_id,
                               error)  # fmt: skip
        deleted = 0
        for entry_id in bad:  # counted only if this XDEL removed it (another shard may have)
            keys = [self.redis_keys.experience, self.redis_keys.counters]
            deleted += int(self._delete_bad(keys=keys, args=[entry_id]))
        return deleted

    def _read(self, stream_id: str, count: int, block_ms: int | None) -> list:
        try:
            response = self.client.xreadgroup(
                REPLAY_GROUP,
                self.consumer,
                {self.redis_keys.experience: stream_id},
                count=count,
                block=block_ms,
            )
        except redis.ResponseError as error:
            if "NOGROUP" not in str(error):
                raise
            # Redis came back without its data (an external server without persistence):
            # the group (and the stream) are made again; what was lost is lost.
            logger.warning("shard %d: the stream's consumer group is gone; creating it again",
                           self.shard_id)  # fmt: skip
            self._create_group()
            return []
        return response[0][1] if response else []

    def _create_group(self) -> None:
        try:
            self.client.xgroup_create(
                self.redis_keys.experience, REPLAY_GROUP, id="0", mkstream=True
            )
        except redis.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    def _maybe_trim(self, now_or_never: bool = False) -> None:
        """Deletes stream entries every consumer is done with, so XLEN is the backlog: at most
        once a second, unless `now_or_never` (the last one, at shutdown)."""
        now = time.monotonic()
        if now - self._last_trim < 1.0 and not now_or_never:
            return
        self._last_trim = now
        groups = self.client.xinfo_groups(self.redis_keys.experience)
        boundary = None
        for group in groups:
            delivered = group.get("last-delivered-id", b"0-0")
            candidates = [_next_id(delivered)]
            if group.get("pending", 0):
                summary = self.client.xpending(self.redis_keys.experience, group["name"])
                if summary.get("min"):
                    candidates.append(_as_str(summary["min"]))
                if _as_str(group["name"]) == REPLAY_GROUP:
                    self._check_own_pending(summary)
            low = min(candidates, key=_id_key)
            boundary = low if boundary is None else min(boundary, low, key=_id_key)
        if boundary is not None:
            self.client.xtrim(self.redis_keys.experience, minid=boundary, approximate=False)

    def _check_own_pending(self, summary: dict) -> None:
        """Entries delivered to this shard that it never took in (the reply to an XREADGROUP
        was lost and the client's retry read the next ones) stay pending for ever: never acked,
        never trimmed, a backlog that grows until the actors stop. Read them again."""
        mine = sum(int(consumer["pending"]) for consumer in summary.get("consumers") or []
                   if _as_str(consumer["name"]) == self.consumer)  # fmt: skip
        if mine > len(self._unacked) and not self._reading_own_pending:
            logger.warning("shard %d: %d entries delivered to it are not acked (a lost reply "
                           "or ack); reading them again", self.shard_id,
                           mine - len(self._unacked))  # fmt: skip
            self._reading_own_pending = True

    def sample(self, batch_size: int) -> Sample | None:
        """A prioritized batch, or None while the rate limiter (or emptiness) holds it back."""
        if not self.replay.can_sample(batch_size):
            return None
        return self.replay.sample(batch_size)

    def update_priorities(self, keys: np.ndarray, td_abs: np.ndarray) -> int:
        return self.replay.update_priorities(keys, td_abs)

    def total_priority(self) -> float:
        return self.replay.tree.total

    def stats(self) -> dict[str, float]:
        return self.replay.stats()

    def snapshot(self, path: pathlib.Path) -> None:
        self.replay.snapshot(path)

    def restore(self, path: pathlib.Path | None) -> int:
        """Restores a snapshot (None: there is none, the shard starts empty); returns (and logs,
        and adds to the run's counter replay_transitions_lost) how many transitions this shard
        had taken in that the snapshot lacks: a restarted shard's loss. 0 if Redis does not know
        (a new run, or a resumed one with a new Redis)."""
        if path is not None:
            self.replay.restore(path)
        restored = self.replay.transitions_inserted
        reached = self.client.hget(self.redis_keys.shards, self._inserted_field)
        if reached is None and path is None:
            return 0  # a shard's first start
        lost = max(int(reached) - restored, 0) if reached is not None else 0
        commands = [
            ("HSET", self.redis_keys.shards, self._inserted_field, restored),
            ("HINCRBY", self.redis_keys.counters, "replay_transitions_lost", lost),
        ]
        self._acks.write(lambda: (commands, None))  # a later loss counts from here
        logger.warning("shard %d restored its snapshot (%d transitions taken in, in all); the %d "
                       "taken in since are lost", self.shard_id, restored, lost)  # fmt: skip
        return lost


def _as_str(stream_id) -> str:
    return stream_id.decode() if isinstance(stream_id, bytes) else str(stream_id)


def _id_key(stream_id: str) -> tuple[int, int]:
    milliseconds, _, sequence = stream_id.partition("-")
    return int(milliseconds), int(sequence or 0)


def _next_id(stream_id) -> str:
    milliseconds, sequence = _id_key(_as_str(stream_id))
    return f"{milliseconds}-{sequence + 1}"
