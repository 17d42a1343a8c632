"""The evaluation schedule a checkpoint saves: a round still in flight (the Ray evaluator plays
it while training goes on) is saved as not yet started, so a resumed run plays it again."""

import pytest

from launch.config import PreparedRun, TrainConfig
from launch.local_backend import LocalBackend
from launch.trainer import Trainer


@pytest.mark.parametrize(
    ("eval_round", "next_eval_at", "in_flight_since", "saved"),
    [
        # none in flight: the next round is the one after the last that started
        (3, 200_000, None, {"eval_round": 3, "next_eval_at": 200_000}),
        # round 2 (seeds of round 2) started at 150,040 and has not finished
        (3, 200_000, 150_040, {"eval_round": 2, "next_eval_at": 150_040}),
    ],
)
def test_a_checkpoint_saves_an_unfinished_round_as_not_started(
    tmp_path, eval_round, next_eval_at, in_flight_since, saved
):
    config = TrainConfig(serial=True)
    trainer = Trainer(PreparedRun(config, tmp_path, None), LocalBackend(config, tmp_path))
    trainer.eval_round, trainer.next_eval_at = eval_round, next_eval_at
    trainer._eval_started_at = in_flight_since
    assert trainer._eval_schedule() == saved
    # resumed from it at 160,000 env steps: the unfinished round is due at once, same seeds
    checkpoint = {"counters": {"env_steps": 160_000}, "trainer": trainer._eval_schedule()}
    resumed = Trainer(PreparedRun(config, tmp_path, checkpoint), LocalBackend(config, tmp_path))
    assert {"eval_round": resumed.eval_round, "next_eval_at": resumed.next_eval_at} == saved
    assert (resumed.next_eval_at <= 160_000) == (in_flight_since is not None)
