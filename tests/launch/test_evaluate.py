"""Evaluation settings: seeds per round, bad values named; the constant-action floor."""

import dataclasses

import pytest

from common.config import EnvConfig, NetworkConfig
from common.mario_env import make_env
from launch.evaluate import EVAL_SEED_BASE, Evaluator, TrainEvalConfig, summarize

B = EVAL_SEED_BASE  # 10**9


@pytest.mark.parametrize(
    ("episodes", "round_index", "seeds"),
    [(3, 0, [B, B + 1, B + 2]), (3, 2, [B + 6, B + 7, B + 8]), (1, 5, [B + 5])],
)
def test_each_evaluation_round_plays_new_seeds(episodes, round_index, seeds):
    assert TrainEvalConfig(episodes=episodes).seeds(round_index) == seeds


def test_summary_picks_a_flag_first_then_the_furthest():
    episodes = [
        {"flag_get": False, "max_x_pos": 2000, "return": 900.0, "length": 300},
        {"flag_get": True, "max_x_pos": 1500, "return": 500.0, "length": 200},  # pole, x reset
        {"flag_get": False, "max_x_pos": 400, "return": 100.0, "length": 100},
    ]
    summary = summarize(episodes)
    assert summary["best_episode"] == 1
    assert summary["flag_rate"] == pytest.approx(1 / 3)
    assert summary["max_x_pos_mean"] == pytest.approx(1300.0)
    assert summary["max_x_pos_median"] == 1500
    assert summary["return_mean"] == pytest.approx(500.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_env_steps": -1}, r"every_env_steps \(-1\)"),
        ({"episodes": 0}, r"episodes \(0\) must be >= 1"),
        ({"sticky_action_prob": 1.0}, r"sticky_action_prob \(1.0\)"),
    ],
)
def test_bad_eval_settings_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainEvalConfig(**kwargs)


@pytest.mark.parametrize("action", [0, 1])
def test_a_constant_action_policy_plays_that_action_at_every_step(action):
    # The real emulator: the evaluator's episode is the one stepped by hand with `action` (no
    # sticky actions, no no-ops), whatever its network would choose; 0 and 1 differ, which one
    # network could not both match.
    env_config = EnvConfig(action_set="right_jump", max_episode_steps=80)
    env_config = dataclasses.replace(env_config, sticky_action_prob=0.0, noop_max=0)
    evaluator = Evaluator(env_config, NetworkConfig(), constant_action=action)
    try:
        played = evaluator.play(seed=3)
    finally:
        evaluator.close()
    env = make_env(env_config)
    try:
        _, info = env.reset(seed=3)
        max_x, length, total = info["x_pos"], 0, 0.0
        while True:
            _, reward, terminated, truncated, info = env.step(action)
            max_x, length, total = max(max_x, info["x_pos"]), length + 1, total + reward
            if terminated or truncated:
                break
    finally:
        env.close()
    assert (played["max_x_pos"], played["length"], played["return"]) == (max_x, length, total)
