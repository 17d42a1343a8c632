"""The distributed learner loop: batches from the replay client, updates, weight publishing.

No Ray here: the replay client passed in hides where batches come from (Ray calls to the
shards in launch/ray_backend.py, several requests in flight).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Protocol

import numpy as np

from common.redis_io import RedisEndpoint
from common.wire import encode_record, encode_weights
from learner.learner import Learner, cpu_copy

if TYPE_CHECKING:  # a type only: the learner imports no other role
    from replay_server.replay import Sample

logger = logging.getLogger("learner")
# The average of the weights (--learner.ema-decay) goes to Redis with every this many-th publish
# of the weights (and the first and last): only the evaluator reads it, once a round, and each
# publish copies, compresses and SETs 3.3 MB.
AVERAGE_PUBLISH_EVERY = 10


class ReplayClient(Protocol):
    """Where the learner's batches come from."""

    def next_sample(self, batch_size: int) -> tuple[int, Sample] | None:
        """The next prefetched batch and its shard, or None if none is ready yet."""

    def update_priorities(self, shard_id: int, keys: np.ndarray, td_abs: np.ndarray) -> None:
        """Sends new priorities without waiting for the shard (or holds them to send later)."""

    def flush(self) -> None:
        """Sends the priorities it holds back: the learner stops."""


class LearnerRunner:
    """Updates until stop(); publishes weights as version = number of updates."""

    def __init__(
        self,
        learner: Learner,
        replay: ReplayClient,
        endpoint: RedisEndpoint,
        *,
        publish_every_updates: int = 50,
        report_every_s: float = 2.0,
    ):
        """`publish_every_updates`: weights go to Redis every this many updates;
        `report_every_s`: seconds between stats reports (and heartbeats)."""
        self.learner = learner
        self.replay = replay
        self.publish_every_updates = publish_every_updates
        self.report_every_s = report_every_s
        self.batch_size = learner.config.batch_size
        self.client = endpoint.connect()
        self.redis_keys = endpoint.keys
        self._stop = threading.Event()
        self._lock = threading.Lock()  # state_dict() for checkpoints vs the update loop
        self.meter = LearnerMeter(learner)
        self._publishes = 0
        self.publish()

    def stop(self) -> None:
        self._stop.set()

    def publish(self, last: bool = False) -> int:
        """SETs the weights blob (and their average's, if kept, every AVERAGE_PUBLISH_EVERY-th
        time and the `last`) and then its version, in one MULTI; returns the version."""
        version = self.learner.updates
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self.redis_keys.weights, encode_weights(self.learner.cpu_weights(), version))
        average_due = last or self._publishes % AVERAGE_PUBLISH_EVERY == 0
        self._publishes += 1
        if self.learner.ema is not None and average_due:
            pipe.set(self.redis_keys.ema_weights,
                     encode_weights(self.learner.cpu_weights("ema"), version))  # fmt: skip
        pipe.set(self.redis_keys.weights_version, version)
        pipe.execute()
        return version

    def state_dict(self) -> dict:
        """A CPU copy of the learner's state, taken between two updates."""
        with self._lock:
            return cpu_copy(self.learner.state_dict())

    def run(self, max_updates: int | None = None) -> dict:
        """Learns until stop() (or max_updates); returns final counters."""
        learner = self.learner
        last_report, metrics = time.monotonic(), {}
        while not self._stop.is_set():
            if max_updates is not None and learner.updates >= max_updates:
                break
            now = time.monotonic()
            if now - last_report >= self.report_every_s:  # also while it waits for the replay
                pipe = self.client.pipeline(transaction=False)
                pipe.hset(self.redis_keys.heartbeats, "learner", time.time())
                pipe.hset(
                    self.redis_keys.stats, "learner", encode_record(self.meter.report(metrics))
                )
                pipe.hset(self.redis_keys.counters, "updates", learner.updates)
                pipe.execute()
                last_report = now
            wait_start = time.monotonic()
            item = self.replay.next_sample(self.batch_size)
            if item is None:
                self.meter.waited(time.monotonic() - wait_start)
                continue
            shard_id, sample = item
            with self._lock:
                metrics, td_abs = learner.update(sample)
            self.replay.update_priorities(shard_id, sample.keys, td_abs)
            if learner.updates % self.publish_every_updates == 0:
                self.publish()
        self.replay.flush()
        self.publish(last=True)
        self.client.hset(self.redis_keys.counters, "updates", learner.updates)
        return {"updates": learner.updates}


class LearnerMeter:
    """The learner's rates between two reports: updates/s, samples/s and the fraction of the
    time it waited for batches. The same stats in both backends."""

    def __init__(self, learner: Learner):
        self.learner = learner
        self._since = time.monotonic()
        self._updates = learner.updates
        self._waited_s = 0.0

    def waited(self, seconds: float) -> None:
        """Counts time spent without a batch to learn from."""
        self._waited_s += seconds

    def report(self, metrics: dict[str, float]) -> dict[str, float]:
        """The last update's metrics plus the rates since the previous report."""
        now = time.monotonic()
        interval = max(now - self._since, 1e-9)
        updates = self.learner.updates - self._updates
        stats = {
            **metrics,
            "learner/updates_per_s": updates / interval,
            "learner/samples_per_s": updates * self.learner.config.batch_size / interval,
            "learner/waiting_fraction": min(self._waited_s / interval, 1.0),
        }
        gpu_utilization = _gpu_utilization(self.learner.device)
        if gpu_utilization is not None:
            stats["learner/gpu_utilization"] = gpu_utilization
        self._since, self._updates, self._waited_s = now, self.learner.updates, 0.0
        return stats


def _gpu_utilization(device) -> float | None:
    """Percent busy of the learner's GPU over the last sample period (None off CUDA)."""
    if device.type != "cuda":
        return None
    try:
        import torch

        return float(torch.cuda.utilization(device))
    except Exception:  # needs NVML (pynvml); a missing library must not stop learning
        return None
