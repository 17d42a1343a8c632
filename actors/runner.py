"""The distributed actor loop around ActorCore: chunks to Redis, weights from Redis, telemetry.

No Ray here: launch/ray_backend.py wraps it as a Ray actor (1 CPU, restarted on death).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
import uuid

import redis

from actors.actor import ActorCore
from common.redis_io import OnceWriter, RedisEndpoint
from common.wire import WireError, decode_weights, encode_chunk, encode_record

logger = logging.getLogger("actor")
TELEMETRY_MAXLEN = 100_000


class ActorRunner:
    """Plays until stop() with the latest published weights, pushing chunks to the stream.

    Redis outages: its client fails fast, and the actor goes on playing. Chunks it cannot send
    wait in a local buffer of at most `max_unsent_chunks` (then it waits, retrying with
    backoff, and drops nothing); episode records wait too, and the env-step and frame counts
    are sent as increments once Redis answers again, so no counter loses what it missed."""

    def __init__(
        self,
        core: ActorCore,
        endpoint: RedisEndpoint,
        *,
        weights_poll_frames: int = 400,
        heartbeat_s: float = 2.0,
        max_unsent_chunks: int = 64,
    ):
        """`weights_poll_frames`: emulator frames between checks of the weights version;
        `heartbeat_s`: seconds between heartbeats and rate reports."""
        self.core = core
        self.name = f"actor-{core.actor_id}"
        self.weights_poll_frames = weights_poll_frames
        self.heartbeat_s = heartbeat_s
        self.max_unsent_chunks = max_unsent_chunks
        self.redis_config = endpoint.config
        self.client = endpoint.connect(outage_s=0)
        self.redis_keys = endpoint.keys
        self.run_id = endpoint.run_id
        self._stop = threading.Event()
        self.chunks_written = 0
        self.episodes = 0
        self.weight_updates = 0
        self.bad_weights = 0
        self.unsent: collections.deque = collections.deque()  # chunks Redis has not taken yet
        self._records: collections.deque = collections.deque(maxlen=10_000)  # episodes, unsent
        self._reported = {"env_steps": core.env_steps, "frames": core.frames}
        # exactly once, also when Redis applied a batch and died before it could answer
        incarnation = uuid.uuid4().hex[:12]
        self._writers = {channel: OnceWriter(self.client, self.redis_keys,
                                             f"{self.name}:{incarnation}:{channel}")
                         for channel in ("chunks", "records", "counts")}  # fmt: skip
        self._down_since: float | None = None
        self._retry_at, self._backoff = 0.0, 0.1

    def stop(self) -> None:
        self._stop.set()

    def _redis(self, what: str, call, force: bool = False) -> bool:
        """Runs a Redis call; on a lost connection notes the outage and returns False. During
        an outage calls are not even tried until a backoff (0.1 s doubling to 5 s) has passed,
        unless `force`: a host that does not answer costs a connect timeout each time."""
        now = time.monotonic()
        if self._down_since is not None and now < self._retry_at and not force:
            return False
        try:
            call()
        except (redis.ConnectionError, redis.TimeoutError) as error:
            if self._down_since is None:
                self._down_since, self._backoff = now, 0.1
                logger.warning("%s: Redis unavailable (%s) at %s; playing on, keeping chunks "
                               "(at most %d)", self.name, error, what,
                               self.max_unsent_chunks)  # fmt: skip
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(2 * self._backoff, 5.0)
            return False
        if self._down_since is not None:
            logger.warning("%s: Redis is back after %.1f s", self.name,
                           time.monotonic() - self._down_since)  # fmt: skip
            self._down_since = None
        return True

    def _poll_weights(self) -> None:
        """New weights if the version changed; the run's env steps for the ε schedule."""
        self._redis("weights", self._fetch_weights)

    def _fetch_weights(self) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.get(self.redis_keys.weights_version)
        pipe.hget(self.redis_keys.counters, "env_steps")
        version, run_env_steps = pipe.execute()
        try:  # both are written by the run's own roles; anything else is counted and skipped
            run_env_steps = int(run_env_steps or 0)
            version = None if version is None else int(version)
        except ValueError:
            self.bad_weights += 1
            logger.warning("%s ignored a bad weights version %r or env steps %r", self.name,
                           version, run_env_steps)  # fmt: skip
            return
        self.core.set_run_env_steps(run_env_steps)
        if version is None or version == self.core.policy_version:
            return
        blob = self.client.get(self.redis_keys.weights)
        if blob is None:
            return
        try:
            state, blob_version = decode_weights(blob, self.core.network.state_dict())
        except WireError as error:
            self.bad_weights += 1
            logger.warning("%s ignored bad weights: %s", self.name, error)
            return
        self.core.set_weights(state, blob_version)
        self.weight_updates += 1

    def _push(self, chunks) -> None:
        """Queues the chunks and sends what the backlog allows; while the buffer is full (Redis
        down), waits with backoff."""
        self.unsent.extend(chunks)
        while not self._redis("chunks", self._send) and not self._stop.is_set():
            if len(self.unsent) < self.max_unsent_chunks:
                return
            self._stop.wait(max(0.05, self._retry_at - time.monotonic()))

    def _send(self) -> None:
        backlog_limit = self.redis_config.max_stream_chunks
        # Backpressure: wait while the replay shards are this far behind (XLEN is the backlog,
        # since shards trim what they consumed). The MAXLEN ~ cap is only a safety net.
        while True:
            room = backlog_limit - self.client.xlen(self.redis_keys.experience)
            if room > 0 or self._stop.is_set():
                break
            self._stop.wait(0.05)
        if not self.unsent:
            return

        def batch():  # no more than the backlog has room for (many actors back from an outage)
            chunks = [self.unsent[i] for i in range(min(len(self.unsent), max(room, 1)))]
            key, cap = self.redis_keys.experience, 4 * backlog_limit
            commands = [("XADD", key, "MAXLEN", "~", cap, "*", "c", encode_chunk(c, self.run_id))
                        for c in chunks]  # fmt: skip
            counters = self.redis_keys.counters
            commands.append(("HINCRBY", counters, "chunks_written", len(chunks)))
            commands.append(("HINCRBY", counters, "transitions_written",
                             sum(len(c) for c in chunks)))  # fmt: skip
            return commands, len(chunks)

        sent = self._writers["chunks"].write(batch)  # the chunks stay in `unsent` until then
        for _ in range(sent):
            self.unsent.popleft()
        self.chunks_written += sent

    def _send_records(self) -> None:
        def batch():
            records = list(self._records)
            self._records.clear()
            key = self.redis_keys.telemetry
            return [("XADD", key, "MAXLEN", "~", TELEMETRY_MAXLEN, "*", "m", encode_record(r))
                    for r in records], records  # fmt: skip

        writer = self._writers["records"]
        writer.flush()  # the batch a lost connection left first, then what came since
        if self._records:
            writer.write(batch)

    def _send_counts(self, stats: dict | None = None) -> None:
        """Heartbeat, stats, and the env steps and frames played since the last report."""

        def batch():
            core, commands = self.core, []
            if stats is not None:
                commands.append(("HSET", self.redis_keys.heartbeats, self.name, time.time()))
                commands.append(("HSET", self.redis_keys.stats, self.name, encode_record(stats)))
            counters = self.redis_keys.counters
            for name, now in (("env_steps", core.env_steps), ("frames", core.frames)):
                commands.append(("HINCRBY", counters, name, now - self._reported[name]))
                self._reported[name] = now  # in this batch now, sent at least once
            return commands, None

        self._writers["counts"].flush()  # an older heartbeat's batch first, then this one
        self._writers["counts"].write(batch)

    def unsent_records(self) -> int:
        """Episode records Redis has not acknowledged."""
        return len(self._records) + len(self._writers["records"].pending or ())

    def run(self, max_env_steps: int | None = None) -> dict:
        """Acts until stop() (or max_env_steps); returns final counters."""
        core = self.core
        self._poll_weights()
        next_poll = core.frames + self.weights_poll_frames
        last_beat, last_steps, last_frames = time.monotonic(), core.env_steps, core.frames
        while not self._stop.is_set():
            if max_env_steps is not None and core.env_steps >= max_env_steps:
                break
            finished = core.step()
            chunks = core.take_chunks()
            if chunks or self.unsent:
                self._push(chunks)
            for episode in finished:
                record = dataclasses.asdict(episode)
                record.update(kind="episode", actor=self.name, policy_version=core.policy_version)
                self._records.append(record)
                self.episodes += 1
            if self._records or self._writers["records"].busy:
                self._redis("episodes", self._send_records)
            if core.frames >= next_poll:
                self._poll_weights()
                next_poll = core.frames + self.weights_poll_frames
            now = time.monotonic()
            if now - last_beat >= self.heartbeat_s:
                interval = now - last_beat
                stats = {
                    "env_steps": core.env_steps,
                    "frames": core.frames,
                    "env_steps_per_s": (core.env_steps - last_steps) / interval,
                    "frames_per_s": (core.frames - last_frames) / interval,
                    "policy_version": core.policy_version,
                    "chunks_written": self.chunks_written,
                    "chunks_unsent": len(self.unsent),
                }
                self._redis("heartbeat", lambda stats=stats: self._send_counts(stats))
                last_beat, last_steps, last_frames = now, core.env_steps, core.frames
        self._push(core.take_chunks(flush=True))
        self._flush_before_exit()
        core.close()
        return {
            "env_steps": core.env_steps,
            "frames": core.frames,
            "chunks_written": self.chunks_written,
            "chunks_unsent": len(self.unsent),
            "weight_updates": self.weight_updates,
            "policy_version": core.policy_version,
        }

    def _flush_before_exit(self, timeout_s: float = 30.0) -> None:
        """Sends what is left (retrying through a short outage); says what could not be sent."""
        deadline, delay = time.monotonic() + timeout_s, 0.05
        while True:
            left = len(self.unsent) + self.unsent_records()
            sent = (self._redis("exit", self._send, force=True) and not self.unsent
                    and self._redis("exit", self._send_records, force=True)
                    and not self.unsent_records())  # fmt: skip
            if sent and self._redis("exit", self._send_counts, force=True):
                return
            if time.monotonic() > deadline:
                logger.error(
                    "%s: Redis unavailable at exit: %d chunks and %d episode records not sent",
                    self.name, len(self.unsent), self.unsent_records(),
                )  # fmt: skip
                return
            if len(self.unsent) + self.unsent_records() < left:
                delay = 0.05  # it goes out (one batch a round while the stream is full)
                continue
            time.sleep(delay)
            delay = min(2 * delay, 2.0)
