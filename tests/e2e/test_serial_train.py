"""Tiny-budget end-to-end runs of the real commands: train --serial, resume, eval."""

import json

import numpy as np
import pytest
import torch

from launch.cli import main
from learner.checkpoint import CheckpointError, load_checkpoint

TINY = [
    "train",
    "--serial",
    "--replay.capacity", "2000",
    "--replay.min-size-to-sample", "200",
    "--replay.samples-per-insert", "2",
    "--replay.rate-error-buffer", "64",
    "--learner.batch-size", "16",
    "--learner.target-sync-updates", "10",
    "--actor.envs-per-actor", "2",
    "--actor.chunk-length", "50",
    "--env.max-episode-steps", "200",
    "--publish-every-updates", "5",
    "--wandb", "offline",
    "--no-live-display",
    "--log-every-s", "0.5",
]  # fmt: skip


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    main([*TINY, "--total-env-steps", "400", "--run-dir", str(run_dir)])
    return run_dir


def test_train_writes_checkpoint_metrics_and_wandb(trained_run):
    payload = load_checkpoint(trained_run)
    counters = payload["counters"]
    assert counters["env_steps"] >= 400
    assert counters["updates"] > 0
    # the rate limiter holds the replay ratio near samples_per_insert / batch = 1/8 per step
    assert counters["updates"] <= (counters["env_steps"] - 200) * 2 / 16 + 64 / 16 + 1
    assert (trained_run / "replay-0.npz").exists()
    records = [
        json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()
    ]
    assert any("episode/x_pos" in r for r in records)
    assert any("learner/loss" in r for r in records)
    assert list((trained_run / "wandb").glob("offline-run-*"))  # W&B wrote its offline files


def test_resume_continues_counters_and_replay(trained_run):
    before = load_checkpoint(trained_run)["counters"]
    main([*TINY, "--total-env-steps", "600", "--resume", str(trained_run)])
    after = load_checkpoint(trained_run)["counters"]
    assert after["env_steps"] >= 600
    assert after["frames"] > before["frames"] + 4 * 150  # frames continue from the checkpoint
    assert after["updates"] > before["updates"]
    assert after["episodes"] >= before["episodes"]
    # The replay was restored warm: what both runs inserted is counted. Each exit flushes
    # partial chunks; only the ≤ n = 3 transitions per env awaiting a value are lost.
    with np.load(trained_run / "replay-0.npz") as snapshot:
        inserted = int(snapshot["counters"][7])
    assert after["env_steps"] - 2 * 2 * 3 <= inserted <= after["env_steps"]


def test_eval_prints_stats_and_writes_video(trained_run, capsys):
    main(["eval", str(trained_run), "--episodes", "2", "--max-episode-steps", "60"])
    summary = json.loads((trained_run / "eval" / "eval.json").read_text())
    assert summary["episodes"] == 2 and summary["sticky_action_prob"] == 0.25
    assert 0 <= summary["flag_rate"] <= 1 and summary["max_x_pos_max"] >= 40
    video = trained_run / "eval" / "best_episode.mp4"
    assert video.stat().st_size > 1000
    import imageio.v2 as imageio

    reader = imageio.get_reader(video)
    first = reader.get_data(0)
    assert first.shape == (240, 256, 3)
    reader.close()
    assert "flag_rate" in capsys.readouterr().out


def test_bad_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "checkpoint.pt"
    torch.save({"something": 1}, bad)
    with pytest.raises(CheckpointError, match="not a format-1"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing")
    with pytest.raises(SystemExit):
        main(["eval", str(bad)])


def test_bad_train_arguments_name_the_value():
    with pytest.raises(SystemExit):
        main(["train", "--serial", "--env.level", "9-9"])
    with pytest.raises(SystemExit):
        main(["train", "--serial", "--learner.batch-size", "0"])
    with pytest.raises(SystemExit):
        main(["train", "--redis-url", "http://localhost:6379"])


def test_existing_run_dir_needs_resume_and_resume_existing_continues(trained_run, capsys):
    before = load_checkpoint(trained_run)["counters"]["env_steps"]
    with pytest.raises(SystemExit):  # would overwrite a checkpoint
        main([*TINY, "--total-env-steps", "10", "--run-dir", str(trained_run)])
    assert f"run_dir {trained_run} already holds a checkpoint" in capsys.readouterr().out
    budget = before + 100
    main([*TINY, "--total-env-steps", str(budget), "--run-dir", str(trained_run),
          "--resume-existing"])  # fmt: skip
    assert load_checkpoint(trained_run)["counters"]["env_steps"] >= budget
