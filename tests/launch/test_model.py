"""Model folders: bad files are errors that name the file; bad play options name the value."""

import json

import pytest
import torch

from common.config import EnvConfig, NetworkConfig, config_to_dict
from common.networks import build_network
from launch.cli import main
from launch.model import MODEL_CONFIG, MODEL_WEIGHTS, PlayConfig, load_policy
from learner.checkpoint import CheckpointError


def _folder(tmp_path, weights: bytes | None = None, config: str | None = None):
    folder = tmp_path / "model"
    folder.mkdir()
    if weights is None:
        torch.save({"w": torch.zeros(2)}, folder / MODEL_WEIGHTS)
    else:
        (folder / MODEL_WEIGHTS).write_bytes(weights)
    (folder / MODEL_CONFIG).write_text(config if config is not None else json.dumps(
        {"env": {"level": "1-1"}, "network": {"dueling": True}}))  # fmt: skip
    return folder


@pytest.mark.parametrize(
    "weights, config, message",
    [
        (b"\x00not a torch file", None, "cannot load model weights .*model.pt"),
        (None, "{not json", "cannot read the model config .*config.json"),
        (None, json.dumps({"env": {}}), "cannot read the model config .*config.json.*network"),
        (None, json.dumps({"env": {"level": "9-9"}, "network": {}}), "9-9"),
    ],
)
def test_a_bad_model_folder_is_an_error_naming_the_file(tmp_path, weights, config, message):
    folder = _folder(tmp_path, weights, config)
    with pytest.raises((CheckpointError, ValueError), match=message):
        load_policy(folder)


def test_a_model_folder_loads_as_float32(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    env = EnvConfig(level="1-2")
    network = build_network(NetworkConfig(), env.num_actions, env.frame_stack)
    torch.save({k: v.half() for k, v in network.state_dict().items()}, folder / MODEL_WEIGHTS)
    (folder / MODEL_CONFIG).write_text(json.dumps({"env": {"level": "1-2"}, "network": {}}))
    policy = load_policy(folder)
    assert all(w.dtype == torch.float32 for w in policy.weights.values())
    assert policy.env.level == "1-2"
    assert policy.source == folder / MODEL_WEIGHTS and policy.env_steps is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"out": "mario.png"}, "out .*mario.png.* must end in .gif or .mp4"),
        ({"sticky_action_prob": 1.0}, r"sticky_action_prob \(1.0\)"),
        ({"frame_every": 0}, r"frame_every \(0\)"),
    ],
)
def test_bad_play_options_name_the_value(kwargs, message):
    import pathlib

    kwargs = {k: pathlib.Path(v) if k == "out" else v for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=message):
        PlayConfig(model=pathlib.Path("m"), **kwargs)


def test_play_of_a_missing_model_exits_1_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["play", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.gif")])
    assert exit_info.value.code == 1
    assert "nothing" in capsys.readouterr().out


def test_online_play_of_a_checkpoint_that_has_no_average_yet_plays_its_online_net(tmp_path):
    # A branch that turns the average on from a parent without one: until its first own
    # checkpoint, checkpoint.pt holds only the online net; --online plays it (the refusal is
    # for rounds and best.pt, which hold only the average)
    from launch.config import TrainConfig
    from learner.checkpoint import save_checkpoint

    config = config_to_dict(TrainConfig())  # the defaults keep an average (ema_decay > 0)
    assert config["learner"]["ema_decay"] > 0
    env = EnvConfig(**config["env"])
    network = build_network(NetworkConfig(**config["network"]), env.num_actions, env.frame_stack)
    payload = {"learner": {"online": network.state_dict(), "updates": 3}, "config": config,
               "counters": {"env_steps": 100, "updates": 3}}  # fmt: skip
    path = save_checkpoint(tmp_path, payload, name="checkpoint-copy.pt")
    played = load_policy(path, online=True).weights
    assert all(torch.equal(played[k], v) for k, v in network.state_dict().items())
    round_path = save_checkpoint(tmp_path, {**payload, "eval": {"flag_rate": 0.5}}, name="r.pt")
    with pytest.raises(CheckpointError, match=r"r\.pt holds only the average of the weights"):
        load_policy(round_path, online=True)
