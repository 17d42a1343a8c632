"""The evaluation schedule a checkpoint saves: a round still in flight (the Ray evaluator plays
it while training goes on) is saved as not yet started, so a resumed run plays it again; and a
resumed run is done (nothing is started) only once it has its final round; a round that fails is
skipped in serial mode as in the Ray backend."""

import contextlib
import pathlib

import pytest

from actors.actor import ActorConfig
from launch.config import PreparedRun, TrainConfig, TrainEvalConfig
from launch.local_backend import LocalBackend
from launch.trainer import Trainer, _budget_spent


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


@pytest.mark.parametrize(
    ("env_steps", "last_eval_at", "every", "branched", "spent"),
    [
        (2_000_000, 2_000_000, 50_000, False, True),  # the budget and its final round
        (2_000_040, 2_000_040, 50_000, False, True),  # (the budget's round is past it)
        (2_000_000, 1_950_000, 50_000, False, False),  # the final round was cut short
        (2_000_000, None, 50_000, False, False),  # never evaluated
        (2_000_000, None, 0, False, True),  # a run that does not evaluate
        (1_999_990, 1_950_000, 50_000, False, False),  # short of the budget
        (2_000_000, 2_000_000, 50_000, True, False),  # a branch made now (prepare_run refuses)
    ],
)
def test_a_run_has_spent_its_budget_once_it_has_its_final_evaluation(
    env_steps, last_eval_at, every, branched, spent
):
    config = TrainConfig(total_env_steps=2_000_000, eval=TrainEvalConfig(every_env_steps=every))
    last_eval = None if last_eval_at is None else {"env_steps": last_eval_at}
    checkpoint = {"counters": {"env_steps": env_steps}, "trainer": {"last_eval": last_eval}}
    run = PreparedRun(config, pathlib.Path("runs/x"), checkpoint,
                      pathlib.Path("runs/parent") if branched else None)  # fmt: skip
    assert _budget_spent(run) == spent


def test_a_failed_evaluation_round_is_skipped_in_serial_mode_as_in_ray(
    tmp_path, monkeypatch, caplog
):
    """A round whose evaluation raises is logged and lost, not the run: eval_result() gives {}
    (what the Ray backend gives when its evaluator fails), and the next round plays."""
    from launch import local_backend
    from launch.evaluate import EVAL_SEED_BASE

    config = TrainConfig(serial=True, actor=ActorConfig(envs_per_actor=1))
    backend = LocalBackend(config, tmp_path)
    unbeatable = (2.0, 0.0)  # no round beats it: no video is recorded
    with contextlib.ExitStack() as resources, caplog.at_level("WARNING", logger="serial"):
        backend.start(resources, None)
        backend.start_eval([EVAL_SEED_BASE], unbeatable, tmp_path / "best.mp4")
        assert backend.eval_result()["episodes"] == 1
        broken = backend._evaluator

        def emulator_gone(*args):
            raise OSError("the emulator is gone")

        with monkeypatch.context() as patch:
            patch.setattr(local_backend, "evaluate_round", emulator_gone)
            backend.start_eval([EVAL_SEED_BASE], unbeatable, tmp_path / "best.mp4")
        assert backend.eval_result() == {}
        assert "evaluation failed: the emulator is gone" in caplog.text
        assert backend.eval_result() is None  # once
        backend.start_eval([EVAL_SEED_BASE], unbeatable, tmp_path / "best.mp4")  # the next round
        result = backend.eval_result()
        assert result["episodes"] == 1 and result["policy_version"] == 0
        assert backend._evaluator is not broken  # a failed round's evaluator is not reused
