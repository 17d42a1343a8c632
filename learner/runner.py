"""The distributed learner loop: batches from the replay client, updates, weight publishing.

No Ray here: the replay client passed in hides where batches come from (Ray calls to the
shards in common/distributed.py, several requests in flight).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Protocol

import msgpack
import numpy as np

from common.config import NetworkConfig
from common.redis_io import RedisConfig, RedisKeys, connect
from common.wire import encode_weights
from learner.learner import Learner, LearnerConfig
from replay_server.replay import Sample

logger = logging.getLogger("learner")


class ReplayClient(Protocol):
    """Where the learner's batches come from."""

    def next_sample(self, batch_size: int) -> tuple[int, Sample] | None:
        """The next prefetched batch and its shard, or None if none is ready yet."""

    def update_priorities(self, shard_id: int, keys: np.ndarray, td_abs: np.ndarray) -> None:
        """Sends new priorities without waiting for the shard."""


@dataclasses.dataclass(frozen=True)
class LearnerRunnerConfig:
    """Distributed learner."""

    publish_every_updates: int = 50
    """Publish weights to Redis every this many updates."""
    report_every_s: float = 2.0
    """Seconds between stats reports to Redis."""


class LearnerRunner:
    """Updates until stop(); publishes weights as version = number of updates."""

    def __init__(
        self,
        learner_config: LearnerConfig,
        network_config: NetworkConfig,
        num_actions: int,
        stack: int,
        runner_config: LearnerRunnerConfig,
        redis_url: str,
        run_id: str,
        replay: ReplayClient,
        redis_config: RedisConfig | None = None,
        state: dict | None = None,
    ):
        self.learner = Learner(learner_config, network_config, num_actions, stack)
        if state is not None:
            self.learner.load_state_dict(state)
        self.config = runner_config
        self.batch_size = learner_config.batch_size
        self.client = connect(redis_url, redis_config)
        self.keys = RedisKeys(run_id)
        self.replay = replay
        self._stop = threading.Event()
        self._lock = threading.Lock()  # state_dict() for checkpoints vs the update loop
        self.last_metrics: dict = {}
        self.publish()

    def stop(self) -> None:
        self._stop.set()

    def publish(self) -> int:
        """SETs the weights blob and then its version (in one MULTI); returns the version."""
        version = self.learner.updates
        blob = encode_weights(self.learner.cpu_weights(), version)
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self.keys.weights, blob)
        pipe.set(self.keys.weights_version, version)
        pipe.execute()
        return version

    def state_dict(self) -> dict:
        with self._lock:
            return {k: v for k, v in self.learner.state_dict().items()}

    def run(self, max_updates: int | None = None) -> dict:
        """Learns until stop() (or max_updates); returns final counters."""
        learner = self.learner
        last_report, last_updates, waited_s = time.monotonic(), learner.updates, 0.0
        while not self._stop.is_set():
            if max_updates is not None and learner.updates >= max_updates:
                break
            wait_start = time.monotonic()
            item = self.replay.next_sample(self.batch_size)
            if item is None:
                waited_s += time.monotonic() - wait_start
                continue
            shard_id, sample = item
            with self._lock:
                metrics, td_abs = learner.update(sample)
            self.replay.update_priorities(shard_id, sample.keys, td_abs)
            self.last_metrics = metrics
            if learner.updates % self.config.publish_every_updates == 0:
                self.publish()
            now = time.monotonic()
            if now - last_report >= self.config.report_every_s:
                interval = now - last_report
                stats = {
                    **metrics,
                    "learner/updates_per_s": (learner.updates - last_updates) / interval,
                    "learner/samples_per_s": (learner.updates - last_updates)
                    * self.batch_size
                    / interval,
                    "learner/waiting_fraction": waited_s / interval,
                }
                gpu_utilization = _gpu_utilization(self.learner.device)
                if gpu_utilization is not None:
                    stats["learner/gpu_utilization"] = gpu_utilization
                pipe = self.client.pipeline(transaction=False)
                pipe.hset(self.keys.heartbeats, "learner", time.time())
                pipe.hset(self.keys.stats, "learner", msgpack.packb(stats))
                pipe.execute()
                last_report, last_updates, waited_s = now, learner.updates, 0.0
        self.publish()
        return {"updates": learner.updates}


def _gpu_utilization(device) -> float | None:
    """Percent busy of the learner's GPU over the last sample period (None off CUDA)."""
    if device.type != "cuda":
        return None
    try:
        import torch

        return float(torch.cuda.utilization(device))
    except Exception:  # needs NVML (pynvml); a missing library must not stop learning
        return None
