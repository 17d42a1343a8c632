"""Metrics sink: JSONL in the run directory plus W&B, written by a background thread.

The training loop only puts dicts on a queue, so a slow disk or a W&B hiccup never stalls it.
W&B runs online only when an API key is configured, offline otherwise, or not at all.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import queue
import threading

logger = logging.getLogger("metrics")
WANDB_MODES = ("auto", "online", "offline", "disabled")
_VIDEO = "__video__"  # marks a queued record whose named value is an mp4 path


def resolve_wandb_mode(mode: str) -> str:
    """auto → online when WANDB_API_KEY is set (and WANDB_MODE does not say otherwise)."""
    if mode not in WANDB_MODES:
        raise ValueError(f"wandb mode {mode!r} is unknown; accepted: {', '.join(WANDB_MODES)}")
    if mode != "auto":
        return mode
    env_mode = os.environ.get("WANDB_MODE")
    if env_mode in ("online", "offline", "disabled"):
        return env_mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class MetricsLogger:
    """log(metrics, step) from the training loop; close() flushes everything.

    Two threads: one appends each record to metrics.jsonl (local disk, at once), and hands it on
    to the other, which feeds W&B (its start and its calls can stall on the network): the JSONL
    never waits for W&B, and a close whose W&B is stuck still has every line written."""

    def __init__(
        self, run_dir: pathlib.Path, config: dict, wandb_mode: str = "auto", resume: bool = False
    ):
        self.path = run_dir / "metrics.jsonl"
        run_dir.mkdir(parents=True, exist_ok=True)
        self._queue: queue.Queue = queue.Queue(maxsize=10_000)
        self._wandb_queue: queue.Queue = queue.Queue(maxsize=10_000)
        self._written = threading.Event()  # the JSONL thread has written its last record
        self._mode = resolve_wandb_mode(wandb_mode)
        self._run_dir = run_dir
        self._config = config
        self._resume = resume
        self.dropped = 0  # records not written (queue full, or not JSON)
        self.wandb_dropped = 0  # records written but not sent to W&B (its queue full)
        self._thread = threading.Thread(target=self._work, name="metrics", daemon=True)
        self._wandb_thread = threading.Thread(target=self._feed_wandb, name="metrics-wandb",
                                              daemon=True)  # fmt: skip
        self._thread.start()
        self._wandb_thread.start()

    def log(self, metrics: dict, step: int) -> None:
        """Queues one record; never blocks (drops and counts when the queue is full)."""
        try:
            self._queue.put_nowait({"step": step, **metrics})
        except queue.Full:
            self.dropped += 1

    def log_video(self, name: str, path: str, step: int) -> None:
        """Queues a video (an mp4 file): its path in the JSONL, the video itself in W&B."""
        try:
            self._queue.put_nowait({"step": step, name: str(path), _VIDEO: name})
        except queue.Full:
            self.dropped += 1

    def close(self, timeout_s: float = 30.0) -> None:
        """Writes what is queued to the JSONL, then gives W&B up to `timeout_s` to take the
        rest and finish."""
        try:
            self._queue.put(None, timeout=timeout_s)  # full only if the writer died (disk)
        except queue.Full:
            logger.warning("the metrics writer is not taking records; closing without it")
        self._thread.join(timeout_s)
        self._wandb_thread.join(timeout_s)
        if self._wandb_thread.is_alive():
            logger.warning("W&B did not finish within %.0f s; metrics.jsonl is complete",
                           timeout_s)  # fmt: skip

    def _start_wandb(self):
        if self._mode == "disabled":
            return None
        env_mode = os.environ.get("WANDB_MODE")
        if env_mode is not None and env_mode not in ("online", "offline", "disabled"):
            # e.g. an empty WANDB_MODE from a compose file: W&B itself would refuse to start
            logger.warning("ignoring WANDB_MODE=%r (not online, offline or disabled)", env_mode)
            del os.environ["WANDB_MODE"]
        try:
            import wandb

            return wandb.init(
                project=os.environ.get("WANDB_PROJECT") or "mario-apex",
                entity=os.environ.get("WANDB_ENTITY") or None,
                dir=str(self._run_dir),
                config=self._config,
                mode=self._mode,
                name=self._run_dir.name,
                id=self._run_dir.name.replace("/", "-"),
                resume="allow" if self._resume else None,
                settings=wandb.Settings(silent=True, console="off"),
            )
        except Exception as error:  # W&B must never take training down
            logger.warning("W&B disabled: %s", error)
            return None

    def _work(self) -> None:
        try:
            with self.path.open("a") as jsonl:
                while (record := self._queue.get()) is not None:
                    video = record.pop(_VIDEO, None)
                    try:
                        line = json.dumps(record)
                    except (TypeError, ValueError) as error:  # a bug upstream: one record lost
                        self.dropped += 1
                        logger.warning("metrics record at step %s not written: %s",
                                       record.get("step"), error)  # fmt: skip
                        continue
                    jsonl.write(line + "\n")
                    jsonl.flush()
                    try:
                        self._wandb_queue.put_nowait((record, video))
                    except queue.Full:
                        self.wandb_dropped += 1
        finally:
            self._written.set()

    def _feed_wandb(self) -> None:
        run = self._start_wandb()
        while True:
            try:
                record, video = self._wandb_queue.get(timeout=0.2)
            except queue.Empty:
                # nothing is queued after _written is set: empty then means done
                if self._written.is_set() and self._wandb_queue.empty():
                    break
                continue
            if run is None:
                continue
            try:
                values = {k: v for k, v in record.items() if k != "step"}
                if video is not None:
                    import wandb

                    values[video] = wandb.Video(values[video], format="mp4")
                run.log(values, step=record["step"])
            except Exception as error:
                logger.warning("W&B log failed, disabling: %s", error)
                run = None
        if run is not None:
            try:
                run.finish()
            except Exception as error:
                logger.warning("W&B finish failed: %s", error)
