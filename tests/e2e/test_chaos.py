"""The chaos run (slow: `scripts/test -m slow tests/e2e/test_chaos.py`): mario train while a
random role (actor, shard, learner, redis-server) is SIGKILLed every 20 s for 3 minutes."""

import json

import pytest

from launch.cli import main

TINY = ("--replay.capacity 4000 --replay.min-size-to-sample 300 --replay.samples-per-insert 2 "
        "--learner.batch-size 16 --actor.envs-per-actor 2 --actor.chunk-length 50 "
        "--env.max-episode-steps 200 --distributed.num-actors 2 --eval.every-env-steps 0 "
        "--checkpoint-minutes 0.5")  # fmt: skip


@pytest.mark.slow
def test_chaos_run_passes_its_checks(tmp_path):
    run_dir = tmp_path / "chaos"
    main(["chaos", "--run-dir", str(run_dir), "--minutes", "3", "--every-s", "20",
          f"--train-args={TINY}"])  # fmt: skip
    result = json.loads((run_dir / "chaos.json").read_text())
    assert result["passed"], result
    assert {kill["role"] for kill in result["kills"] if kill["pid"]} >= {"learner", "redis-server"}
