"""The distributed actor loop around ActorCore: chunks to Redis, weights from Redis, telemetry.

No Ray here: launch/ray_backend.py wraps it as a Ray actor (1 CPU, restarted on death).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

from actors.actor import ActorCore
from common.redis_io import RedisEndpoint
from common.wire import WireError, decode_weights, encode_chunk, encode_record

logger = logging.getLogger("actor")
TELEMETRY_MAXLEN = 100_000


class ActorRunner:
    """Plays until stop() with the latest published weights, pushing chunks to the stream."""

    def __init__(
        self,
        core: ActorCore,
        endpoint: RedisEndpoint,
        *,
        weights_poll_frames: int = 400,
        heartbeat_s: float = 2.0,
    ):
        """`weights_poll_frames`: emulator frames between checks of the weights version;
        `heartbeat_s`: seconds between heartbeats and rate reports."""
        self.core = core
        self.name = f"actor-{core.actor_id}"
        self.weights_poll_frames = weights_poll_frames
        self.heartbeat_s = heartbeat_s
        self.redis_config = endpoint.config
        self.client = endpoint.connect()
        self.redis_keys = endpoint.keys
        self.run_id = endpoint.run_id
        self._stop = threading.Event()
        self.chunks_written = 0
        self.weight_updates = 0
        self.bad_weights = 0

    def stop(self) -> None:
        self._stop.set()

    def _poll_weights(self) -> None:
        """New weights if the version changed; the run's env steps for the ε schedule."""
        pipe = self.client.pipeline(transaction=False)
        pipe.get(self.redis_keys.weights_version)
        pipe.hget(self.redis_keys.counters, "env_steps")
        version, run_env_steps = pipe.execute()
        self.core.set_run_env_steps(int(run_env_steps or 0))
        if version is None or int(version) == self.core.policy_version:
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
        backlog_limit = self.redis_config.max_stream_chunks
        # Backpressure: wait while the replay shards are this far behind (XLEN is the backlog,
        # since shards trim what they consumed). The MAXLEN ~ cap is only a safety net.
        while (
            self.client.xlen(self.redis_keys.experience) >= backlog_limit
            and not self._stop.is_set()
        ):
            self._stop.wait(0.05)
        pipe = self.client.pipeline(transaction=True)
        for chunk in chunks:
            pipe.xadd(
                self.redis_keys.experience,
                {b"c": encode_chunk(chunk, self.run_id)},
                maxlen=4 * backlog_limit,
                approximate=True,
            )
        pipe.hincrby(self.redis_keys.counters, "chunks_written", len(chunks))
        pipe.hincrby(self.redis_keys.counters, "transitions_written", sum(len(c) for c in chunks))
        pipe.execute()
        self.chunks_written += len(chunks)

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
            if chunks:
                self._push(chunks)
            if finished:
                pipe = self.client.pipeline(transaction=False)
                for episode in finished:
                    record = dataclasses.asdict(episode)
                    record.update(
                        kind="episode", actor=self.name, policy_version=core.policy_version
                    )
                    pipe.xadd(
                        self.redis_keys.telemetry,
                        {b"m": encode_record(record)},
                        maxlen=TELEMETRY_MAXLEN,
                        approximate=True,
                    )
                pipe.execute()
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
                }
                pipe = self.client.pipeline(transaction=False)
                pipe.hset(self.redis_keys.heartbeats, self.name, time.time())
                pipe.hset(self.redis_keys.stats, self.name, encode_record(stats))
                pipe.hincrby(self.redis_keys.counters, "env_steps", core.env_steps - last_steps)
                pipe.hincrby(self.redis_keys.counters, "frames", core.frames - last_frames)
                pipe.execute()
                last_beat, last_steps, last_frames = now, core.env_steps, core.frames
        chunks = core.take_chunks(flush=True)
        if chunks:
            self._push(chunks)
        pipe = self.client.pipeline(transaction=False)
        pipe.hincrby(self.redis_keys.counters, "env_steps", core.env_steps - last_steps)
        pipe.hincrby(self.redis_keys.counters, "frames", core.frames - last_frames)
        pipe.execute()
        core.close()
        return {
            "env_steps": core.env_steps,
            "frames": core.frames,
            "chunks_written": self.chunks_written,
            "weight_updates": self.weight_updates,
            "policy_version": core.policy_version,
        }
