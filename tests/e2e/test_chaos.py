"""The chaos run: `mario train` while its roles (actor, shard, learner, redis-server) are
SIGKILLed one after another. A short round (each role once) is in the default suite; the long
one (every 20 s for 3 minutes) is slow: `scripts/test -m slow tests/e2e/test_chaos.py`."""

import json
import re

import numpy as np
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


def test_a_short_chaos_round_kills_each_role_once_and_passes_its_checks(tmp_path, capsys):
    """The default suite's chaos round: an actor, a replay shard (of two), the learner and the
    redis-server each SIGKILLed once, 10 s apart; training goes on and the books balance."""
    run_dir = tmp_path / "round"
    main(["chaos", "--run-dir", str(run_dir), "--minutes", "4", "--every-s", "10", "--kills",
          "4", "--seed", "6", f"--train-args={TINY} --distributed.num-shards 2"])  # fmt: skip
    result = json.loads((run_dir / "chaos.json").read_text())
    assert result["passed"], result
    killed = [kill["role"] for kill in result["kills"] if kill["pid"]]
    assert killed == result["order"] == ["actor", "shard", "learner", "redis-server"]  # seed 6
    log = (run_dir / "chaos-train.log").read_text()
    died = re.search(r"actor (\d+) died \(.*\); Ray restarts it", log)
    assert died and f"actor {died[1]} runs on node" in log[died.end() :]  # restarted, placed
    learner = re.search(r"the learner died \(\w+\); restarting it from its state of update \d+"
                        r".*: (\d+) updates lost", log)  # fmt: skip
    assert learner
    costs = {row["role"]: row for row in result["losses"]}  # what each kill cost, in the books
    assert list(costs) == killed and costs["learner"]["updates_lost"] == int(learner[1])
    final = result["final_counters"]
    assert costs["shard"]["replay_transitions_lost"] == final.get("replay_transitions_lost", 0)
    assert all(row["env_steps_after"] > 0 for row in result["losses"])  # it went on after each
    for shard in (0, 1):  # both shards took chunks from the stream through the consumer group
        with np.load(run_dir / f"replay-{shard}.npz") as snapshot:
            assert int(snapshot["counters"][7]) > 0
    assert "ok chunks_accounted" in capsys.readouterr().out
