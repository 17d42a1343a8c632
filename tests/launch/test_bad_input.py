"""Bad input to the commands other than `mario train`: a clear error that names the value, and
nothing already there is lost (the train command's own are in tests/launch/test_train_config.py
and tests/e2e)."""

import dataclasses
import json

import pytest
import torch

from common.config import EnvConfig, NetworkConfig
from common.networks import build_network
from launch.cli import main


def _error(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    printed = capsys.readouterr()
    return exit_info.value.code, " ".join((printed.out + printed.err).split())


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["plot"], 2, "run_dirs: give at least one run directory"),
        (["plot", "{tmp}", "--window", "0"], 2, "window (0) must be >= 1 episode"),
        (["ablation", "run"], 2, "rows: name at least one row to train; known: base"),
        (["ablation", "run", "base", "--checkpoint-minutes", "0"], 2,
         "checkpoint_minutes (0.0) must be > 0"),
        (["ablation", "report", "--env-steps", "-5"], 2, "env_steps (-5) must be >= 1"),
        (["ablation", "floor", "--out", "{tmp}/floor.txt"], 2, "floor.txt) must be a .json file"),
        (["ablation", "floor", "--rows", "refrence"], 2, "rows ['refrence'] are unknown; known:"),
        (["ablation", "report", "--root", "{tmp}", "--archive", "{tmp}", "--floor", "{file}"], 1,
         "file is not a floor file: JSONDecodeError("),
        (["bench", "replay", "--chunk-length", "0"], 2, "chunk_length (0) must be >= 1"),
        (["bench", "replay", "--capacity", "100"], 2,
         "capacity (100) must hold a chunk (chunk_length 100) and a batch (batch_size 512)"),
        (["bench", "replay", "--sample-seconds", "0"], 2, "sample_seconds (0.0) must be > 0"),
        (["bench", "replay", "--cpu", "4096"], 2, "cpu (4096) is not a core this process may"),
        (["bench", "actor", "--seconds", "0"], 2, "seconds (0.0) must be > 0"),
        # a bad --out is found before the measurement, not after it
        (["bench", "replay", "--out", "{tmp}"], 1, "is a directory: give the path of the JSON"),
        (["bench", "learner", "--out", "{file}/x.json"], 1, "[Errno 17] File exists"),
        (["bench", "env", "--cpu", "4096"], 2, "cpu (4096) is not a core this process may"),
        (["bench", "system", "--seconds", "10"], 2, "seconds (10.0) must be >= 40.0"),
        (["chaos", '--train-args=--seed "1'], 2,
         "train_args '--seed \"1': No closing quotation"),
        (["export", "{tmp}", "--round", "5", "--last"], 2, "round (5) and last exclude each other"),
        (["export", "{tmp}", "--round", "5", "--average", "2"], 2,
         "average (2) must be an odd number >= 1"),
        (["export", "{tmp}", "--average", "3"], 2, "average (3) needs --round"),
        (["pick", "{tmp}", "--average", "0"], 2, "average (0) must be an odd number >= 1"),
        (["status", "--redis-url", "notaurl"], 2,
         "redis_url 'notaurl' must start with redis://, rediss:// or unix://"),
        (["eval", "{tmp}", "--max-episode-steps", "0"], 2, "max_episode_steps (0) must be >= 1"),
        (["eval", "{tmp}", "--constant-action", "-1"], 2, "constant_action (-1) must be >= 0"),
        (["play", "{tmp}", "--max-episode-steps", "0", "--out", "m.gif"], 2,
         "max_episode_steps (0) must be >= 1"),
        (["pick", "{tmp}", "--top", "0"], 2, "top (0) must be >= 1"),
        (["pick", "{tmp}", "--episodes", "0"], 2, "episodes (0) must be >= 1"),
        (["pick", "{tmp}", "--seeds", "1000", "1010"], 2,
         "seeds (1000, 1010): the sets of 20 episodes from 1000 and 1010 overlap"),
        (["pick", "{tmp}/nothing"], 1, "nothing is not a directory"),
        (["pick", "{tmp}", "--seeds", "-5"], 2, "seeds: -5 must be in [0, 999999980]"),
        (["pick", "{tmp}", "--seeds", "1000000000"], 2,
         "the seeds are training's own evaluation rounds'"),
        (["pick", "{tmp}", "--out", "{tmp}"], 2, "is a directory: give the path of the JSON"),
        (["pick", "{tmp}", "--out", "{tmp}/pick"], 2, "pick does not end in .json"),
        (["pick", "{tmp}"], 1, "holds no round weights (round-*.pt): the run was trained before"),
        (["churn", "{tmp}"], 1, "holds no round weights (round-*.pt) at or after 0 env steps"),
        (["churn", "{tmp}", "--states", "0"], 2, "states (0) must be >= 1"),
        (["churn", "{tmp}", "--states-from", "{file}"], 2, "states_from is not a run directory"),
        (["train", "--learner.ema-decay", "0", "--eval.compare-online"], 2,
         "eval.compare_online (True) compares the online net with the average of its weights, "
         "but learner.ema_decay is 0.0 (no average): give --learner.ema-decay too"),
        (["train", "--learner.ema-decay", "1"], 2, "ema_decay (1.0) must be in [0, 1)"),
        (["train", "--learner.advantage-learning", "1"], 2,
         "advantage_learning (1.0) must be in [0, 1)"),
        (["train", "--distributed.batches-per-request", "0"], 2,
         "batches_per_request (0) must be >= 1"),
        (["train", "--wandb", "off"], 2,
         "wandb 'off' is unknown; accepted: auto, online, offline, disabled"),
        (["train", "--seed", "-1"], 2, "seed (-1) must be >= 0"),
        (["train", "--actor.epsilon-base", "4"], 2, "epsilon_base (4.0) must be in (0, 1]"),
        (["train", "--actor.epsilon-alpha", "-7"], 2, "epsilon_alpha (-7.0) must be >= 0"),
        (["train", "--learner.huber-delta", "0"], 2, "huber_delta (0.0) must be > 0"),
        (["train", "--learner.adam-epsilon", "-1"], 2, "adam_epsilon (-1.0) must be > 0"),
        (["train", "--learner.device", "cuda:x"], 2,
         "device 'cuda:x' is unknown; accepted: auto, cpu, cuda, cuda:N, mps"),
        (["train", "--resume", "{file}"], 1, "file) must be a run directory, not a file (the run:"),
        # found when the roles start, before anything trains (and before it is recorded)
        (["train", "--serial", "--learner.device", "cuda:99", "--run-dir", "{tmp}/gpu",
          "--wandb", "disabled", "--no-live-display"], 1,
         "device 'cuda:99': this machine has"),
        (["train", "--redis-url", "redis://127.0.0.1:1/0", "--run-dir", "{tmp}/r",
          "--wandb", "disabled", "--no-live-display"], 1,
         "redis_url redis://127.0.0.1:1/0: cannot use this Redis (ConnectionError"),
        (["eval", "{tmp}", "--seed", "-5"], 2, "seed (-5) must be >= 0"),
        (["play", "{tmp}", "--seed", "-1", "--out", "m.gif"], 2, "seed (-1) must be >= 0"),
        (["export", "{tmp}", "--seed", "-1"], 2, "seed (-1) must be >= 0"),
        (["churn", "{tmp}", "--seed", "-1"], 2, "seed (-1) must be >= 0"),
        (["grid", "--seed", "-1"], 2, "seed (-1) must be >= 0"),
        (["status", "--run-id", "no-such-run"], 1,
         "no run directory runs/no-such-run for run_id 'no-such-run': pass --run-dir"),
    ],
)  # fmt: skip
def test_a_bad_argument_is_a_clear_error_naming_it(argv, code, message, tmp_path, capsys,
                                                   monkeypatch):  # fmt: skip
    monkeypatch.chdir(tmp_path)  # `runs/` is the test's own
    (tmp_path / "file").write_text("")
    argv = [arg.format(tmp=tmp_path, file=tmp_path / "file") for arg in argv]
    if argv[0] == "train" and not {"--run-dir", "--resume"} & set(argv):
        # should the value be accepted after all, a short serial run fails the row quickly
        argv += [
            "--serial",
            "--total-env-steps",
            "64",
            "--eval.every-env-steps",
            "0",
            "--run-dir",
            str(tmp_path / "run"),
            "--no-live-display",
        ] + ([] if "--wandb" in argv else ["--wandb", "disabled"])
    got_code, text = _error(argv, capsys)
    assert got_code == code and message in text, text


def test_chaos_refuses_a_directory_that_is_not_an_earlier_chaos_run(tmp_path, capsys):
    run = tmp_path / "precious"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"weeks of training")
    code, text = _error(["chaos", "--run-dir", str(run), "--minutes", "0.1"], capsys)
    assert code == 1
    assert f"run_dir {run} exists and is not an earlier chaos run's directory" in text
    assert (run / "checkpoint.pt").read_bytes() == b"weeks of training"


def test_export_replaces_only_a_model_folder_and_only_with_force(tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "notes"
    run.mkdir()
    out.mkdir()
    (out / "todo.txt").write_text("mine")
    code, text = _error(["export", str(run), "--out", str(out), "--force"], capsys)
    assert code == 1
    assert f"out ({out}) holds files and is not a model folder: pick a new or empty --out" in text
    assert (out / "todo.txt").read_text() == "mine"


def test_weights_that_do_not_fit_the_config_are_named_before_anything_is_written(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    env, network = EnvConfig(), NetworkConfig()
    torch.save(build_network(network, env.num_actions, env.frame_stack).state_dict(),
               model / "model.pt")  # fmt: skip
    wider = dataclasses.replace(network, hidden=network.hidden * 2)
    (model / "config.json").write_text(json.dumps(
        {"env": dataclasses.asdict(env), "network": dataclasses.asdict(wider)}))  # fmt: skip
    for argv in (["eval", str(model), "--out", str(tmp_path / "eval")],
                 ["play", str(model), "--out", str(tmp_path / "play.gif")]):  # fmt: skip
        code, text = _error(argv, capsys)
        assert code == 1
        assert f"the weights in {model / 'model.pt'} do not fit the network its config" in text
        assert "size mismatch" in text
    assert not (tmp_path / "eval").exists() and not (tmp_path / "play.gif").exists()


def test_a_row_whose_training_fails_ends_the_ablation_with_the_row_named(tmp_path, capsys):
    root = tmp_path / "not-a-directory"
    root.write_text("")  # the row's `mario train --run-dir <root>/base` fails at once
    code, text = _error(["ablation", "run", "base", "--root", str(root)], capsys)
    assert code == 1
    assert "row base: mario train exited with 1 (its error is above)" in text
