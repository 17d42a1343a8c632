"""The shipped agent, models/smb-1-1, clears 1-1 from a fresh clone (issue #12)."""

import dataclasses
import json
import pathlib

from launch.evaluate import Evaluator
from launch.model import MAX_WEIGHTS_BYTES, MODEL_CARD, MODEL_WEIGHTS, load_policy

MODEL = pathlib.Path(__file__).resolve().parents[2] / "models" / "smb-1-1"


def test_the_shipped_model_plays_1_1_to_the_flag():
    # One deterministic episode: no sticky actions, no no-ops, greedy.
    policy = load_policy(MODEL)
    env = dataclasses.replace(policy.env, sticky_action_prob=0.0, noop_max=0)
    evaluator = Evaluator(env, policy.network)
    evaluator.network.load_state_dict(policy.weights)
    try:
        result = evaluator.play(seed=0)
    finally:
        evaluator.close()
    assert result["flag_get"], result


def test_the_shipped_model_card_records_its_training_within_the_budget():
    card = json.loads((MODEL / MODEL_CARD).read_text())
    assert card["training"]["env_steps"] <= 2_000_000
    assert card["final_eval"]["episodes"] == 20 and card["final_eval"]["flag_rate"] >= 0.9
    assert (MODEL / MODEL_WEIGHTS).stat().st_size < MAX_WEIGHTS_BYTES
