"""Tiny-budget end-to-end runs of the real commands: train --serial, resume, eval."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from launch.cli import main
from launch.model import card_markdown, load_policy
from learner.checkpoint import CheckpointError, load_checkpoint, round_window

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
    "--eval.every-env-steps", "300",
    "--eval.episodes", "2",
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


def test_resume_without_serial_continues_serially_with_counters_and_replay(trained_run, capsys):
    before = load_checkpoint(trained_run)["counters"]
    # The mode comes from the run: no --serial here, and no Ray or Redis is started.
    flags = [arg for arg in TINY if arg != "--serial"]
    main([*flags, "--total-env-steps", "600", "--resume", str(trained_run)])
    assert json.loads((trained_run / "status.json").read_text())["mode"] == "serial"
    main(["status", "--run-dir", str(trained_run)])  # a serial run has no Redis: its status.json
    assert "(serial; status.json written" in " ".join(capsys.readouterr().out.split())
    assert not (trained_run / "redis_url").exists()
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


def test_each_invocation_is_recorded_with_its_command_commit_and_machine(trained_run):
    lines = (trained_run / "invocations.jsonl").read_text().splitlines()
    first, resumed = (json.loads(line) for line in lines)  # the first run and the resume test's
    assert first["command"][:3] == ["mario", "train", "--serial"]
    assert "--resume" in resumed["command"] and resumed["start_env_steps"] >= 400
    assert first["start_env_steps"] == 0 and len(first["commit"]) == 40
    assert first["machine"]["cpus"] >= 1 and first["machine"]["torch"] == torch.__version__


def test_evaluation_during_training_logs_and_keeps_the_best_weights(trained_run):
    records = [json.loads(x) for x in (trained_run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/flag_rate" in r]
    # Rounds every 300 env steps, and one where each invocation's budget ends it: at 300, at
    # the first run's 400 and at the resumed run's 600 (the resume test runs before this one).
    steps = [r["eval/env_steps"] for r in evals]
    assert len(evals) >= 3 and any(400 <= step < 600 for step in steps) and steps[-1] >= 600
    for record in evals:
        assert {"eval/x_pos_mean", "eval/x_pos_median", "eval/return_mean",
                "eval/policy_version", "eval/env_steps"} <= set(record)  # fmt: skip
        assert record["step"] == record["eval/env_steps"] >= 300
    best = load_checkpoint(trained_run / "best.pt")
    ranks = [(r["eval/flag_rate"], r["eval/x_pos_mean"]) for r in evals]
    assert (best["eval"]["flag_rate"], best["eval"]["x_pos_mean"]) == max(ranks)
    assert best["counters"]["env_steps"] == best["eval"]["env_steps"]
    assert len(best["eval"]["per_episode"]) == 2
    status = json.loads((trained_run / "status.json").read_text())
    assert status["last_eval"]["env_steps"] == evals[-1]["eval/env_steps"]
    # each new best round's best episode as mp4 (the first round is always a new best)
    videos = [r for r in records if "eval/best_episode" in r]
    assert videos and videos[0]["step"] == evals[0]["eval/env_steps"]
    for record in videos:
        assert pathlib.Path(record["eval/best_episode"]).stat().st_size > 1000
    # every round's weights are kept, as a checkpoint of their own: best.pt is one of them
    for record in evals:
        kept = load_checkpoint(trained_run / "eval" / f"round-{record['eval/env_steps']:09d}.pt")
        assert kept["eval"]["flag_rate"] == record["eval/flag_rate"]
        assert kept["counters"]["updates"] == record["eval/policy_version"]
    kept = load_checkpoint(trained_run / "eval" / f"round-{best['eval']['env_steps']:09d}.pt")
    assert all(torch.equal(kept["learner"]["online"][k], w)
               for k, w in best["learner"]["online"].items())  # fmt: skip


def test_eval_prints_stats_and_writes_video(trained_run, capsys):
    main(["eval", str(trained_run), "--episodes", "2", "--max-episode-steps", "60"])
    summary = json.loads((trained_run / "eval" / "eval.json").read_text())
    assert summary["checkpoint"].endswith("best.pt")  # a run's best weights by default
    main(["eval", str(trained_run), "--last", "--episodes", "1", "--max-episode-steps", "30"])
    assert json.loads((trained_run / "eval" / "eval.json").read_text())["checkpoint"] == str(
        trained_run / "checkpoint.pt"
    )
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


def test_the_commands_that_play_run_torch_on_one_thread(trained_run, tmp_path):
    # batch-1 inference: a thread per core slowed `mario eval` ~9x beside a training run
    for command in (
        ["eval", str(trained_run), "--episodes", "1", "--max-episode-steps", "10",
         "--out", str(tmp_path / "eval")],
        ["play", str(trained_run), "--out", str(tmp_path / "p.gif"), "--max-episode-steps", "5"],
    ):  # fmt: skip
        torch.set_num_threads(2)
        main(command)
        assert torch.get_num_threads() == 1, command[0]


def test_a_constant_action_outside_the_action_set_is_named(trained_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(trained_run), "--constant-action", "2", "--out", str(tmp_path / "e")])
    printed = capsys.readouterr()
    assert exit_info.value.code == 1
    assert "constant_action (2) is not an action of right_jump (0..1)" in " ".join(
        (printed.out + printed.err).split()
    )
    assert not (tmp_path / "e").exists()  # refused before anything was written


def test_bad_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "checkpoint.pt"
    torch.save({"something": 1}, bad)
    with pytest.raises(CheckpointError, match="not a format-1"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing")
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(bad)])
    assert exit_info.value.code == 1


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--serial", "--env.level", "9-9"], "'9-9'"),
        (["--serial", "--learner.batch-size", "0"], "batch_size (0)"),
        (["--redis-url", "http://localhost:6379"], "'http://localhost:6379'"),
    ],
)
def test_bad_train_arguments_name_the_value(args, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *args])
    assert exit_info.value.code == 2
    printed = capsys.readouterr()  # tyro's own box (stderr) for a nested config's error
    assert named in " ".join((printed.out + printed.err).split())


def test_existing_run_dir_needs_resume_and_resume_existing_continues(trained_run, capsys):
    before = load_checkpoint(trained_run)["counters"]["env_steps"]
    with pytest.raises(SystemExit):  # would overwrite a checkpoint
        main([*TINY, "--total-env-steps", "10", "--run-dir", str(trained_run)])
    assert f"run_dir {trained_run} already holds a checkpoint" in " ".join(
        capsys.readouterr().out.split()
    )
    budget = before + 100
    main([*TINY, "--total-env-steps", str(budget), "--run-dir", str(trained_run),
          "--resume-existing"])  # fmt: skip
    reached = load_checkpoint(trained_run)["counters"]["env_steps"]
    assert reached >= budget
    capsys.readouterr()
    # Again (a service restarting it): the budget is spent, so nothing is started or written.
    written = {path: path.read_bytes() for path in trained_run.iterdir() if path.is_file()}
    main([*TINY, "--total-env-steps", str(budget), "--run-dir", str(trained_run),
          "--resume-existing"])  # fmt: skip
    text = " ".join(capsys.readouterr().out.split())
    assert f"has spent its budget ({reached:,} of --total-env-steps {budget:,} env steps)" in text
    assert "Give a larger --total-env-steps to go on" in text
    written.pop(trained_run / ".lock")  # rewritten with the pid of each mario train
    assert {path: path.read_bytes() for path in written} == written
    # A resume without --total-env-steps keeps the run's budget (not the default 5,000,000)
    main([*TINY, "--resume", str(trained_run)])
    text = " ".join(capsys.readouterr().out.split())
    assert f"has spent its budget ({reached:,} of --total-env-steps {budget:,} env steps)" in text
    assert {path: path.read_bytes() for path in written} == written


def test_a_branch_goes_on_from_the_parent_with_the_settings_given_changed(trained_run, tmp_path):
    parent = load_checkpoint(trained_run)
    start, branch = parent["counters"]["env_steps"], tmp_path / "branch"
    parent_metrics = (trained_run / "metrics.jsonl").read_text()
    command = [*TINY, "--total-env-steps", str(start + 200), "--run-dir", str(branch),
               "--branch-from", str(trained_run), "--env.sticky-action-prob", "0.25",
               "--learner.learning-rate", "1e-3"]  # fmt: skip
    main(command)
    after = load_checkpoint(branch)
    assert after["config"]["env"]["sticky_action_prob"] == 0.25
    assert after["config"]["learner"]["learning_rate"] == 1e-3
    assert after["learner"]["optimizer"]["param_groups"][0]["lr"] == 1e-3  # in force, too
    assert after["config"]["replay"] == parent["config"]["replay"]  # the rest is the parent's
    assert after["config"]["env"]["level"] == parent["config"]["env"]["level"]
    # Counters, weights' training and replay go on from the parent's checkpoint.
    assert after["counters"]["env_steps"] >= start + 200
    assert after["counters"]["updates"] > parent["counters"]["updates"]
    with np.load(branch / "replay-0.npz") as snapshot:
        assert int(snapshot["counters"][7]) > start - 2 * 2 * 3  # the parent's, restored
    assert load_checkpoint(trained_run)["counters"] == parent["counters"]  # parent untouched
    assert (trained_run / "metrics.jsonl").read_text() == parent_metrics
    # Its history holds the parent's, then its own invocation, which names the parent.
    assert (branch / "metrics.jsonl").read_text().startswith(parent_metrics)
    *inherited, own = (
        json.loads(x) for x in (branch / "invocations.jsonl").read_text().splitlines()
    )
    assert len(inherited) >= 1 and "branched_from" not in inherited[0]
    assert own["branched_from"] == str(trained_run) and own["start_env_steps"] == start
    card = card_markdown({"name": "m", "level": "1-1", "final_eval": None, "eval_curve": [],
                          "training": {"env_steps": 1, "updates": 1, "wall_time_s": None},
                          "weights": {"file": "model.pt", "parameters": 1, "bytes": 1},
                          "invocations": [*inherited, own]})  # fmt: skip
    assert f"from {start:,} env steps (a branch of `{trained_run}`)" in card
    # Started again (a restarting service): the branch resumes; its parent is not read again.
    lines = len((branch / "metrics.jsonl").read_text().splitlines())
    main([*TINY, "--total-env-steps", str(start + 300), "--run-dir", str(branch),
          "--resume-existing", "--branch-from", str(trained_run)])  # fmt: skip
    assert load_checkpoint(branch)["counters"]["env_steps"] >= start + 300
    assert len((branch / "metrics.jsonl").read_text().splitlines()) > lines


def test_a_branch_that_keeps_an_average_plays_it_and_the_online_net_on_the_same_seeds(
    trained_run, tmp_path
):
    start, branch = load_checkpoint(trained_run)["counters"]["env_steps"], tmp_path / "ema"
    main([*TINY, "--total-env-steps", str(start + 300), "--run-dir", str(branch),
          "--branch-from", str(trained_run), "--learner.ema-decay", "0.9",
          "--eval.compare-online"])  # fmt: skip
    learner = load_checkpoint(branch)["learner"]
    assert learner["ema"].keys() == learner["online"].keys()
    # the average (the parent's, moved at the branch's decay) lags the weights the branch trained
    assert any(not torch.equal(learner["ema"][k], learner["online"][k]) for k in learner["ema"])
    records = [json.loads(x) for x in (branch / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in records if "eval/flag_rate" in r and r["eval/env_steps"] > start]
    assert rounds and all("eval_online/flag_rate" in r and "eval_online/x_pos_mean" in r
                          for r in rounds)  # fmt: skip
    # The round at the budget played the average the final checkpoint holds (serial: the
    # learner stopped before it), and the online net on the same seeds; `mario eval` of the
    # run's checkpoint plays the average too.
    last = load_checkpoint(sorted((branch / "eval").glob("round-*.pt"))[-1])
    assert all(torch.equal(last["learner"]["online"][k], learner["ema"][k]) for k in learner["ema"])
    seeds = [e["seed"] for e in last["eval"]["per_episode"]]
    assert seeds == [e["seed"] for e in last["eval"]["online"]["per_episode"]]
    assert last["eval"]["online"]["flag_rate"] == rounds[-1]["eval_online/flag_rate"]
    played = load_policy(branch, last=True).weights
    assert all(torch.equal(played[k], learner["ema"][k]) for k in learner["ema"])
    # `mario eval --last --online` plays the checkpoint's online net; a round keeps none
    played = load_policy(branch, last=True, online=True).weights
    assert all(torch.equal(played[k], learner["online"][k]) for k in learner["online"])
    newest_round = sorted((branch / "eval").glob("round-*.pt"))[-1]
    with pytest.raises(CheckpointError, match=r"round-\d+\.pt holds only the average of the"):
        load_policy(newest_round, online=True)
    # Resumed, its best evaluation has the shape a new run's has (the online net's left out).
    from launch.config import TrainConfig, given_fields, prepare_run
    from launch.local_backend import LocalBackend
    from launch.trainer import Trainer

    resumed = prepare_run(TrainConfig(resume=branch), given_fields(["--resume", str(branch)]))
    trainer = Trainer(resumed, LocalBackend(resumed.config, branch))
    assert trainer.best_eval is not None and not {"online", "per_episode"} & set(trainer.best_eval)
    # A branch of it without the average plays its online net, not the parent's average.
    plain, args = tmp_path / "plain", ["--learner.ema-decay", "0", "--eval.no-compare-online"]
    learner_config = dataclasses.replace(resumed.config.learner, ema_decay=0.0)
    evaluation = dataclasses.replace(resumed.config.eval, compare_online=False)
    made = prepare_run(TrainConfig(run_dir=plain, branch_from=branch, learner=learner_config,
                                   eval=evaluation, total_env_steps=start + 400),
                       given_fields(["--run-dir", str(plain), "--branch-from", str(branch),
                                     "--total-env-steps", str(start + 400), *args]))  # fmt: skip
    assert "ema" not in made.checkpoint["learner"]
    played = load_policy(plain, last=True).weights
    assert all(torch.equal(played[k], learner["online"][k]) for k in learner["online"])


@pytest.mark.parametrize(
    ("args", "inherits"),
    [
        (["--eval.compare-online", "--learner.ema-decay", "0.99"], True),  # same rounds, beside
        (["--eval.every-env-steps", "1000"], True),  # the rounds on another grid
        (["--eval.episodes", "5"], False),  # rounds of another size: not comparable
    ],
)
def test_a_branch_inherits_the_best_evaluation_while_its_rounds_stay_comparable(
    trained_run, tmp_path, args, inherits
):
    from launch.config import TrainConfig, TrainEvalConfig, given_fields, prepare_run
    from learner.checkpoint import BEST_NAME

    branch = tmp_path / "branch"
    base = TrainConfig()
    evaluation = TrainEvalConfig(compare_online="--eval.compare-online" in args,
                                 every_env_steps=1000 if "1000" in args else 300,
                                 episodes=5 if "5" in args else 2)  # fmt: skip
    learner_config = dataclasses.replace(base.learner, ema_decay=0.99 if "0.99" in args else 0.0)
    requested = TrainConfig(run_dir=branch, branch_from=trained_run, eval=evaluation,
                            learner=learner_config)  # fmt: skip
    made = prepare_run(requested, given_fields(["--run-dir", str(branch), "--branch-from",
                                                str(trained_run), *args]))  # fmt: skip
    assert (branch / BEST_NAME).is_file() == inherits
    assert (made.checkpoint["trainer"]["best_eval"] is not None) == inherits


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--network.hidden", "32"], "--network.hidden: the parent has 256, the command line "
         "says 32"),
        (["--replay.samples-per-insert", "8"], "--replay.samples-per-insert: the parent has 2.0,"
         " the command line says 8.0"),
        (["--total-env-steps", "100"], "total_env_steps (100) must exceed the parent's"),
    ],
)  # fmt: skip
def test_a_branch_keeps_what_it_cannot_change_and_says_so(trained_run, tmp_path, flags, message,
                                                          capsys):  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--branch-from", str(trained_run), "--run-dir", str(tmp_path / "b"),
              *flags])  # fmt: skip
    assert exit_info.value.code == 1
    text = capsys.readouterr().out.replace("\n", "")
    assert message in text, text
    assert not (tmp_path / "b" / "checkpoint.pt").exists()


def test_a_branch_made_but_not_yet_trained_resumes_with_its_own_settings(trained_run, tmp_path):
    from launch.config import TrainConfig, given_fields, prepare_run

    branch = tmp_path / "branch"
    args = ["--run-dir", str(branch), "--branch-from", str(trained_run), "--env.flag-bonus", "7"]
    requested = TrainConfig(run_dir=branch, branch_from=trained_run,
                            env=dataclasses.replace(TrainConfig().env, flag_bonus=7.0))  # fmt: skip
    made = prepare_run(requested, given_fields(args))  # as if killed right after this
    assert made.checkpoint["config"]["env"]["flag_bonus"] == 7.0
    # Its own set: checkpoint.pt with the new config, the replay linked, sealed by a manifest.
    assert load_checkpoint(branch)["set_dir"] == branch
    assert (branch / "replay-0.npz").stat().st_ino == (trained_run / "replay-0.npz").stat().st_ino
    again = prepare_run(dataclasses.replace(requested, resume_existing=True), given_fields(args))
    assert again.branched_from is None and again.config.env.flag_bonus == 7.0  # resumed


@pytest.mark.parametrize("best_after_checkpoint", [False, True])
def test_a_branch_inherits_the_best_evaluation_only_with_its_weights(
    trained_run, tmp_path, best_after_checkpoint
):
    """The parent's best.pt is copied unless it is newer than the checkpoint branched from (a
    best round after the last checkpoint); then the checkpoint's best evaluation, whose weights
    best.pt no longer holds, is not inherited either."""
    import shutil

    from launch.config import TrainConfig, given_fields, prepare_run
    from learner.checkpoint import BEST_NAME, save_checkpoint

    parent, branch = tmp_path / "parent", tmp_path / "branch"
    shutil.copytree(trained_run, parent)
    steps = load_checkpoint(parent)["counters"]["env_steps"]
    assert load_checkpoint(parent)["trainer"]["best_eval"] is not None
    if best_after_checkpoint:
        best = load_checkpoint(parent / BEST_NAME)
        best.pop("format")
        best["counters"]["env_steps"] = best["eval"]["env_steps"] = steps + 100
        save_checkpoint(parent, best, name=BEST_NAME)
    branch.mkdir()
    (branch / BEST_NAME).write_bytes(b"left by an attempt that died before its checkpoint")
    args = ["--run-dir", str(branch), "--branch-from", str(parent)]
    made = prepare_run(TrainConfig(run_dir=branch, branch_from=parent), given_fields(args))
    if best_after_checkpoint:
        assert not (branch / BEST_NAME).exists()
    else:
        assert (branch / BEST_NAME).read_bytes() == (parent / BEST_NAME).read_bytes()
    assert (made.checkpoint["trainer"]["best_eval"] is None) == best_after_checkpoint


def test_a_branch_that_changes_the_eval_interval_evaluates_on_its_own_grid(trained_run, tmp_path):
    from launch.config import TrainConfig, given_fields, prepare_run

    steps = load_checkpoint(trained_run)["counters"]["env_steps"]  # on a grid of 300
    branch = tmp_path / "branch"
    args = ["--run-dir", str(branch), "--branch-from", str(trained_run),
            "--eval.every-env-steps", "1000"]  # fmt: skip
    requested = TrainConfig(run_dir=branch, branch_from=trained_run)
    requested = dataclasses.replace(
        requested, eval=dataclasses.replace(requested.eval, every_env_steps=1000)
    )
    made = prepare_run(requested, given_fields(args))
    assert made.checkpoint["trainer"]["next_eval_at"] == (steps // 1000 + 1) * 1000
    # the same evaluation, only less often: the best round and its weights are inherited
    assert made.checkpoint["trainer"]["best_eval"] is not None and (branch / "best.pt").is_file()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        # 32 is the default: given on the command line, it still contradicts the run's 16
        (
            ["--learner.batch-size", "32"],
            "--learner.batch-size: the run has 16, the command line says 32",
        ),
        (["--env.level", "1-2"], "--env.level: the run has '1-1', the command line says '1-2'"),
    ],
)
def test_a_flag_that_contradicts_the_resumed_run_is_an_error_naming_both(
    trained_run, flags, message, capsys
):
    before = load_checkpoint(trained_run)["counters"]
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *flags, "--total-env-steps", "10000", "--resume", str(trained_run)])
    assert exit_info.value.code == 1
    assert message in capsys.readouterr().out.replace("\n", "")
    assert load_checkpoint(trained_run)["counters"] == before  # nothing ran


def test_serial_refuses_options_only_the_ray_backend_has(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--serial", "--distributed.num-shards", "2", "--redis-url", "redis://x",
              "--distributed.batches-per-request", "4"])  # fmt: skip
    captured = capsys.readouterr()
    text = " ".join((captured.out + captured.err).replace("│", " ").split())  # tyro's error box
    assert ("--redis-url ('redis://x'), --distributed.num-shards (2), "
            "--distributed.batches-per-request (4): only the Ray backend") in text  # fmt: skip


@pytest.mark.parametrize(
    ("fault", "error", "saved"),
    [
        # the learner's state could still be read: the final checkpoint holds its 2 updates
        ("MARIO_LEARNER_FAILURE_AT_UPDATE=3",
         "the learner failed: RuntimeError: injected failure at update 3", {"updates": 2}),
        # the actor (2 envs) fails on the step that would pass its 300th env step
        ("MARIO_ACTOR_FAILURE_AT_STEP=300",
         "actor 0 failed: RuntimeError: injected failure at env step 300", {"env_steps": 298}),
    ],
)  # fmt: skip
def test_a_failing_role_ends_the_serial_run_with_its_own_error(tmp_path, fault, error, saved):
    command = [sys.executable, "-m", "launch.cli", *TINY, "--total-env-steps", "5000",
               "--run-dir", str(tmp_path / "run")]  # fmt: skip
    name, value = fault.split("=")
    result = subprocess.run(command, capture_output=True, text=True,
                            env={**os.environ, name: value}, timeout=300)  # fmt: skip
    assert result.returncode == 1
    assert error in " ".join(result.stdout.split())
    assert error.split(": ", 1)[1] in result.stderr  # the traceback, in the log
    counters = load_checkpoint(tmp_path / "run")["counters"]
    assert {key: counters[key] for key in saved} == saved


def test_a_run_killed_during_its_final_evaluation_keeps_its_training(tmp_path):
    # The final checkpoint was written after the final round (up to 15 min on Ray): a crash
    # then lost the training since the last periodic checkpoint. Now the roles' final state is
    # saved first, and a resume owes only the round.
    import signal
    import time

    from launch.trainer import owes_final_eval

    run = tmp_path / "run"
    command = [sys.executable, "-m", "launch.cli", *TINY, "--total-env-steps", "400",
               "--eval.episodes", "40", "--run-dir", str(run)]  # fmt: skip
    with open(tmp_path / "log", "w") as log:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log,
                                   start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            manifest = run / "manifest.json"
            if manifest.is_file() and json.loads(manifest.read_text())["env_steps"] >= 400:
                break
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before it could be killed"
        os.killpg(process.pid, signal.SIGKILL)  # during its final round of 40 episodes
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    payload = load_checkpoint(run)
    assert payload["counters"]["env_steps"] >= 400
    assert owes_final_eval(payload["trainer"]["last_eval"], 400)  # the round is still owed


NO_RAY_SCRIPT = """
import json, sys
from launch.cli import main
from launch.model import card_markdown, load_policy
for command in json.loads(sys.argv[1]):
    main(command)
    assert "ray" not in sys.modules, f"mario {' '.join(command[:2])} imported ray"
print("ray not imported")
"""

NO_RAY_COMMANDS = [
    ["grid", "--episodes", "50", "--out", "{tmp}/grid"],
    ["eval", "{run}", "--episodes", "1", "--max-episode-steps", "30", "--out", "{tmp}/eval"],
    ["plot", "{run}", "--out", "{tmp}/curve.png"],
    ["churn", "{run}", "--states", "16", "--out", "{tmp}/churn.json"],
    ["bench", "replay", "--capacity", "2000", "--sample-seconds", "0.2", "--out", "{tmp}/r"],
    ["bench", "env", "--seconds", "0.2", "--out", "{tmp}/e.json"],
    ["bench", "actor", "--seconds", "0.2", "--out", "{tmp}/a.json"],
]


def test_commands_that_need_no_ray_do_not_import_it(trained_run, tmp_path):
    # one process runs them all in turn (each would pay the imports again), checking after each
    commands = [[a.format(tmp=tmp_path, run=trained_run) for a in c] for c in NO_RAY_COMMANDS]
    result = subprocess.run([sys.executable, "-c", NO_RAY_SCRIPT, json.dumps(commands)],
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ray not imported" in result.stdout
    assert (tmp_path / "e.json").exists() and (tmp_path / "a.json").exists()  # all of them ran


def test_churn_compares_the_kept_rounds_on_states_from_the_replay(trained_run, tmp_path, capsys):
    rounds = sorted((trained_run / "eval").glob("round-*.pt"))
    main(["churn", str(trained_run), "--states", "32", "--out", str(tmp_path / "c.json")])
    result = json.loads((tmp_path / "c.json").read_text())
    assert [row["env_steps"] for row in result["rounds"]] == [int(p.stem[6:]) for p in rounds]
    assert result["rounds"][0]["greedy_changed"] is None
    assert all(0 <= row["greedy_changed"] <= 1 for row in result["rounds"][1:])
    # a run whose two rounds hold the same weights: nothing changes, the same gaps
    twin = tmp_path / "twin"
    (twin / "eval").mkdir(parents=True)
    for steps in (100, 200):
        (twin / "eval" / f"round-{steps:09d}.pt").write_bytes(rounds[-1].read_bytes())
    damaged = twin / "eval" / "round-000000300.pt"
    damaged.write_bytes(b"not a checkpoint")  # left out, named; the others still count
    main(["churn", str(twin), "--states", "32", "--states-from", str(trained_run)])
    twins = json.loads((twin / "eval" / "churn.json").read_text())
    first, second = twins["rounds"]
    assert second["greedy_changed"] == 0.0 and second["gap_median"] == first["gap_median"]
    assert first["gap_median"] == result["rounds"][-1]["gap_median"]  # the same states
    assert list(twins["left_out"]) == [str(damaged)]
    # more states than the replay holds, no round after --since, a run that kept no replay
    # snapshot (the twin: a checkpoint without one): errors that name them
    (twin / "checkpoint.pt").write_bytes((trained_run / "checkpoint.pt").read_bytes())
    held = load_checkpoint(trained_run)["counters"]["transitions_written"]
    for run, args, message in (
        (trained_run, ["--states", str(held + 1000)], f"{trained_run / 'replay-0.npz'} holds only"),
        (trained_run, ["--since", "10000000"],
         "holds no round weights (round-*.pt) at or after 10000000"),
        (twin, [], f"no replay snapshot at {twin / 'replay-0.npz'}"),
    ):  # fmt: skip
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            main(["churn", str(run), *args])
        assert exited.value.code == 1 and message in " ".join(capsys.readouterr().out.split())


def test_export_writes_a_model_folder_that_eval_and_play_take(
    trained_run, tmp_path, capsys, monkeypatch
):
    import imageio.v2 as imageio

    if len(list((trained_run / "eval").glob("round-*.pt"))) < 3:  # run alone: a third round
        steps = load_checkpoint(trained_run)["counters"]["env_steps"]
        main([*TINY, "--total-env-steps", str(steps + 300), "--resume", str(trained_run)])
    out = tmp_path / "smb-test"
    main(["export", str(trained_run), "--out", str(out), "--eval-episodes", "1"])
    best = load_checkpoint(trained_run / "best.pt")
    card = json.loads((out / "model_card.json").read_text())
    assert card["training"]["env_steps"] == best["counters"]["env_steps"]
    assert card["training"]["updates"] == best["counters"]["updates"]
    assert card["source"]["checkpoint"] == "best.pt" and card["selected_by"]["env_steps"] > 0
    assert card["invocations"][0]["command"][:2] == ["mario", "train"]
    assert len(card["eval_curve"]) >= 3 and card["final_eval"]["episodes"] == 1
    assert card["train_config"]["env"] == json.loads((out / "config.json").read_text())["env"]
    weights = torch.load(out / "model.pt", weights_only=True)
    assert weights.keys() == best["learner"]["online"].keys()
    assert all(torch.equal(weights[k], best["learner"]["online"][k]) for k in weights)
    assert "## Final evaluation" in (out / "README.md").read_text()

    last = tmp_path / "smb-last"
    main(["export", str(trained_run), "--last", "--out", str(last), "--eval-episodes", "0"])
    last_card = json.loads((last / "model_card.json").read_text())
    assert last_card["source"]["checkpoint"] == "checkpoint.pt"
    final = load_checkpoint(trained_run)
    assert last_card["training"]["env_steps"] == final["counters"]["env_steps"]
    last_weights = torch.load(last / "model.pt", weights_only=True)
    shipped = final["learner"]["ema"]  # the defaults keep an average of the weights: it ships
    assert all(torch.equal(last_weights[k], shipped[k]) for k in last_weights)

    # a model folder is replaced only on demand
    with pytest.raises(SystemExit):
        main(["export", str(trained_run), "--out", str(last), "--eval-episodes", "0"])
    assert f"out ({last}) is a model folder already: give --force" in " ".join(
        capsys.readouterr().out.split()
    )
    main(["export", str(trained_run), "--out", str(last), "--eval-episodes", "0", "--force"])
    assert json.loads((last / "model_card.json").read_text())["source"]["checkpoint"] == "best.pt"
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty folder is a new one
    first = min(int(p.stem[6:]) for p in (trained_run / "eval").glob("round-*.pt"))
    main(["export", str(trained_run), "--round", str(first), "--out", str(empty),
          "--eval-episodes", "0"])  # fmt: skip
    assert (empty / "model.pt").is_file() and not list(tmp_path.glob(".*.tmp"))
    round_card = json.loads((empty / "model_card.json").read_text())
    assert round_card["source"]["checkpoint"] == f"round-{first:09d}.pt"
    assert round_card["selected_by"]["env_steps"] == round_card["training"]["env_steps"] == first
    # the mean of three rounds' weights, centred on the second (the run kept two or more)
    rounds = sorted(int(p.stem[6:]) for p in (trained_run / "eval").glob("round-*.pt"))
    window = round_window(rounds, rounds[1], 3)
    averaged = tmp_path / "averaged"
    main(["export", str(trained_run), "--round", str(rounds[1]), "--average", "3",
          "--out", str(averaged), "--eval-episodes", "0"])  # fmt: skip
    averaged_card = json.loads((averaged / "model_card.json").read_text())
    assert averaged_card["averaged_rounds"] == window and len(window) >= 2
    assert averaged_card["source"]["checkpoint"] == f"round-{rounds[1]:09d}.pt"
    averaged_weights = torch.load(averaged / "model.pt", weights_only=True)
    members = [load_checkpoint(trained_run / "eval" / f"round-{r:09d}.pt")["learner"]["online"]
               for r in window]  # fmt: skip
    for name, tensor in averaged_weights.items():
        torch.testing.assert_close(tensor, sum(m[name] for m in members) / len(members))
    assert "the mean of those of the evaluation rounds at" in (averaged / "README.md").read_text()
    with pytest.raises(SystemExit):
        main(["export", str(trained_run), "--round", "7", "--out", str(tmp_path / "r7")])
    assert f"round (7): {trained_run} kept no weights of a round at 7 env steps; it kept [" in (
        " ".join(capsys.readouterr().out.split())
    )

    # eval of a model folder leaves the folder's own evaluation (its card's) as it was
    card_eval = (out / "eval" / "eval.json").read_bytes()
    monkeypatch.chdir(tmp_path)
    main(["eval", str(out), "--episodes", "1", "--max-episode-steps", "30"])
    summary = json.loads((tmp_path / "runs" / "eval" / "smb-test" / "eval.json").read_text())
    assert summary["checkpoint"] == str(out / "model.pt")
    assert summary["env_steps_trained"] == card["training"]["env_steps"]
    assert (out / "eval" / "eval.json").read_bytes() == card_eval

    gif, mp4 = tmp_path / "play.gif", tmp_path / "play.mp4"
    main(["play", str(out), "--out", str(gif), "--max-episode-steps", "12", "--frame-every", "2"])
    main(["play", str(out), "--out", str(mp4), "--max-episode-steps", "12"])
    printed = capsys.readouterr().out
    assert printed.count("max x") >= 2 and "12 steps" in printed
    assert len(imageio.mimread(gif)) == 7  # the reset frame and 12 steps, every second one
    assert imageio.get_reader(mp4).count_frames() == 13


def test_a_corrupt_checkpoint_set_resumes_from_the_previous_one(trained_run, tmp_path, caplog):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(trained_run, run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert set(manifest["files"]) == {"checkpoint.pt", "replay-0.npz"}
    previous = json.loads((run_dir / "previous" / "manifest.json").read_text())
    assert previous["env_steps"] < manifest["env_steps"]
    data = bytearray((run_dir / "replay-0.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the replay snapshot
    (run_dir / "replay-0.npz").write_bytes(bytes(data))
    (run_dir / "best.pt").write_bytes(b"")  # as a power loss could leave it: not fatal either
    flags = [arg for arg in TINY if arg != "--serial"]
    with caplog.at_level("INFO"):
        main([*flags, "--total-env-steps", str(previous["env_steps"] + 100), "--resume",
              str(run_dir)])  # fmt: skip
    assert "replay-0.npz: checksum mismatch" in caplog.text
    assert "best.pt is unreadable (cannot load checkpoint" in caplog.text
    assert "best.pt restored from" in caplog.text or "writes best.pt anew" in caplog.text
    assert load_checkpoint(run_dir / "best.pt")["eval"]["env_steps"] > 0  # whole again
    assert f"at {previous['env_steps']} env steps" in caplog.text  # "resuming run … at N"
