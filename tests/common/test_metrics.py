"""The metrics sink: every record reaches metrics.jsonl, whatever W&B does."""

import json
import threading

from common.metrics import MetricsLogger


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_records_are_written_in_order_and_a_bad_one_is_counted_not_fatal(tmp_path):
    metrics = MetricsLogger(tmp_path, {}, wandb_mode="disabled")
    metrics.log({"a": 1}, step=10)
    metrics.log({"bad": b"bytes are not JSON"}, step=20)  # once killed the thread: all later lost
    metrics.log_video("eval/best_episode", str(tmp_path / "best.mp4"), step=30)
    metrics.log({"b": 2.5}, step=40)
    metrics.close()
    assert _lines(tmp_path / "metrics.jsonl") == [
        {"step": 10, "a": 1},
        {"step": 30, "eval/best_episode": str(tmp_path / "best.mp4")},
        {"step": 40, "b": 2.5},
    ]
    assert metrics.dropped == 1


class _StuckRun:
    """A W&B run whose calls hang (the network went away): the fault, not a stand-in for W&B."""

    def __init__(self):
        self.release, self.logged = threading.Event(), []

    def log(self, values, step):
        self.release.wait()
        self.logged.append(step)

    def finish(self):
        pass


def test_a_stuck_wandb_does_not_hold_back_the_jsonl(tmp_path, monkeypatch):
    stuck = _StuckRun()
    monkeypatch.setattr(MetricsLogger, "_start_wandb", lambda self: stuck)
    metrics = MetricsLogger(tmp_path, {}, wandb_mode="offline")
    for step in range(5):
        metrics.log({"eval/flag_rate": step / 10}, step=step)
    metrics.close(timeout_s=0.5)  # W&B is stuck on the first record
    assert [r["step"] for r in _lines(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3, 4]
    stuck.release.set()  # the network is back: W&B gets every record, in order
    metrics._wandb_thread.join(10)
    assert stuck.logged == [0, 1, 2, 3, 4] and not metrics._wandb_thread.is_alive()
