"""Bad deployment settings of `mario train` are clear errors that name the value."""

import os
import pathlib
import socket

import pytest
import redis

from actors.actor import ActorConfig
from common.config import config_to_dict
from launch.cli import main
from launch.config import (
    DistributedConfig,
    TrainConfig,
    _check_no_contradiction,
    _saved_config,
    _with_invocation,
    check_min_size_reachable,
    given_fields,
    prepare_run,
)
from launch.trainer import RUN_LOCK, lock_run_dir
from replay_server.replay import ReplayConfig


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ray_head_port": 6380, "ray_address": "auto"}, r"ray_head_port \(6380\) and ray_address"),
        ({"ray_head_port": 70000}, r"ray_head_port \(70000\) must be a TCP port"),
        ({"ray_dashboard_port": 0}, r"ray_dashboard_port \(0\) must be a TCP port"),
        ({"ray_head_cpus": 0}, r"ray_head_cpus \(0\) must be >= 1"),
        ({"resume_existing": True}, "resume_existing needs --run-dir"),
        # settings of the head --ray-head-port starts are refused without it, not ignored
        (
            {"ray_head_cpus": 4},
            r"^ray_head_cpus \(4\): a setting of the Ray head that --ray",
        ),
        (
            {"ray_dashboard_port": 9000, "ray_head_cpus": 2},
            r"^ray_head_cpus \(2\) and ray_dashboard_port \(9000\): a setting of the Ray head",
        ),
        (
            {"resume": "runs/a", "run_dir": "runs/b"},
            r"resume \(runs/a\) and run_dir \(runs/b\) differ: a resumed run goes on in its own",
        ),
    ],
)
def test_bad_deploy_settings_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


@pytest.mark.parametrize(
    ("capacity", "min_size", "chunk_length", "refused"),
    [
        # 1000 · 1.08 + 64 = 1144 frame slots; chunks of 100 carry 107 frames: the table
        # reaches its capacity (1144 · 100 / 107 = 1069 > 1000)
        (1000, 900, 100, False),
        (1000, 901, 100, True),
        # chunks of 10 carry 17 frames: it settles at 1144 · 10 // 17 = 672 transitions
        (1000, 604, 10, False),
        (1000, 605, 10, True),
    ],
)
def test_a_min_size_to_sample_the_replay_cannot_reach_is_refused(
    capacity, min_size, chunk_length, refused
):
    config = TrainConfig(
        replay=ReplayConfig(capacity=capacity, min_size_to_sample=min_size),
        actor=ActorConfig(chunk_length=chunk_length),
    )  # a saved run with such settings still loads; a new one is refused when prepared
    if not refused:
        check_min_size_reachable(config)
        return
    with pytest.raises(ValueError, match=rf"min_size_to_sample \({min_size}\) must be at most"):
        check_min_size_reachable(config)
    with pytest.raises(ValueError, match=rf"min_size_to_sample \({min_size}\)"):
        prepare_run(config)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_actors": 0}, r"max_actors \(0\)"),
        ({"num_actors": 4, "max_actors": 2}, r"max_actors \(2\) must be >= 1 and >= num_actors"),
    ],
)
def test_bad_actor_counts_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DistributedConfig(**kwargs)


@pytest.mark.parametrize(
    ("num_actors", "max_actors", "resolved"),
    [(None, None, None), (3, None, 3), (None, 8, 8), (2, 5, 5)],
)
def test_max_actors_defaults_to_a_fixed_pool_only_when_num_actors_is_given(
    num_actors, max_actors, resolved
):
    config = DistributedConfig(num_actors=num_actors, max_actors=max_actors)
    assert config.resolved_max_actors == resolved


def test_valid_head_settings():
    config = TrainConfig(ray_head_port=6380, ray_head_cpus=2, run_dir=pathlib.Path("runs/x"),
                         resume_existing=True)  # fmt: skip
    assert config.ray_dashboard_port == 8265


def test_a_busy_head_port_is_a_clear_error_and_leaves_nothing_running(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit) as exit_info:
            main(["train", "--ray-head-port", str(port), "--run-dir", str(tmp_path / "run"),
                  "--wandb", "disabled", "--no-live-display"])  # fmt: skip
    assert exit_info.value.code == 1
    assert f"ray_head_port {port} is not free" in capsys.readouterr().out
    url = (tmp_path / "run" / "redis_url").read_text().strip()
    with pytest.raises(redis.ConnectionError):  # the embedded Redis was stopped
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()


@pytest.mark.parametrize(
    ("args", "given"),
    [
        (["--learner.batch-size", "64"], {"learner.batch_size"}),
        (["--learner.batch-size=64", "--serial"], {"learner.batch_size", "serial"}),
        (["--no-serial", "--learner.no-double"], {"serial", "learner.double"}),
        (["--learner.no_double", "--no_live_display"], {"learner.double", "live_display"}),
        (["--network.conv-channels", "8", "16", "16"], {"network.conv_channels"}),
        (["--env.stuck-is-death", "--resume", "runs/x"], {"env.stuck_is_death", "resume"}),
    ],
)
def test_given_fields_reads_the_flags_of_a_command_line(args, given):
    assert given_fields(args) == given


def test_a_run_directory_in_use_is_refused_naming_the_holder(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with lock_run_dir(run_dir):
        assert (run_dir / RUN_LOCK).read_text().strip() == str(os.getpid())
        in_use = rf"{run_dir} is in use .* \(pid {os.getpid()}\)"
        with pytest.raises(ValueError, match=in_use), lock_run_dir(run_dir):
            pass
        branch = ["--branch-from", str(run_dir), "--run-dir", str(tmp_path / "branch")]
        for flags in (["--run-dir", str(run_dir)], ["--resume", str(run_dir)], branch):
            with pytest.raises(SystemExit) as exit_info:
                main(["train", "--serial", *flags, "--wandb", "disabled", "--no-live-display"])
            assert exit_info.value.code == 1
            text = " ".join(capsys.readouterr().out.split())
            assert f"{flags[0]} {run_dir} is in use by another mario train" in text
        assert list(run_dir.iterdir()) == [run_dir / RUN_LOCK]  # nothing else was written
    with lock_run_dir(run_dir):  # released when its holder lets go (or dies)
        pass


@pytest.mark.parametrize(
    "saved, new, updates, unchanged",
    [
        # the lowlr branch at the new defaults: past the step, learning_rate is not used
        ({"learning_rate_final": 2.5e-5, "learning_rate_decay_start": 180_000},
         {"learning_rate": 2e-5, "learning_rate_final": 2.5e-5,
          "learning_rate_decay_start": 180_000}, 190_000, True),
        # before the step it is
        ({"learning_rate_final": 2.5e-5, "learning_rate_decay_start": 180_000},
         {"learning_rate": 2e-5, "learning_rate_final": 2.5e-5,
          "learning_rate_decay_start": 180_000}, 179_999, False),
        # a new final value changes it
        ({"learning_rate_final": 2.5e-5, "learning_rate_decay_start": 180_000},
         {"learning_rate_final": 1e-5, "learning_rate_decay_start": 180_000}, 190_000, False),
        # a step moved later than now, to the same final value: changes the updates in between
        ({"learning_rate_final": 2.5e-5, "learning_rate_decay_start": 100},
         {"learning_rate_final": 2.5e-5, "learning_rate_decay_start": 300}, 200, False),
        # a fall that ended before now, made longer (but still ended): nothing changes
        ({"learning_rate_final": 2.5e-5, "learning_rate_decay_updates": 100},
         {"learning_rate_final": 2.5e-5, "learning_rate_decay_updates": 150}, 200, True),
        # constant learning rate changed: it changes
        ({}, {"learning_rate": 5e-5}, 10, False),
    ],
)  # fmt: skip
def test_a_branch_is_told_when_its_learning_rate_flags_change_nothing(saved, new, updates,
                                                                       unchanged):  # fmt: skip
    from launch.config import unchanged_step_size
    from learner.learner import LearnerConfig

    note = unchanged_step_size(LearnerConfig(**saved), LearnerConfig(**new), updates)
    assert (note is not None) == unchanged
    if unchanged:
        assert f"from update {updates} on" in note and "--learner.learning-rate-final" in note


def test_a_run_saved_before_the_graphics_option_stays_on_vanilla_graphics():
    # Runs made before --env.graphics existed (all of them on the vanilla ROM) saved no such
    # field; now that the defaults use the downsample ROM, reading them back must not switch
    # them to it.
    from common.config import config_from_dict, config_to_dict

    saved = config_to_dict(TrainConfig())
    del saved["env"]["graphics"]
    assert TrainConfig().env.graphics == "downsample"
    assert config_from_dict(TrainConfig, saved).env.graphics == "vanilla"


def test_a_saved_run_is_read_without_the_settings_of_the_invocation_that_saved_it():
    # --ray-head-cpus without --ray-head-port was ignored once, and saved: a resume must still
    # read the run (the command line gives this invocation's deployment settings anyway)
    saved = {**config_to_dict(TrainConfig()), "ray_head_cpus": 4, "ray_dashboard_port": 9000,
             "total_env_steps": 1_000}  # fmt: skip
    config = _saved_config({"config": saved})
    assert (config.ray_head_cpus, config.ray_dashboard_port) == (None, 8265)
    # a training setting it holds is still validated
    with pytest.raises(ValueError, match=r"n_step \(0\) must be >= 1"):
        _saved_config({"config": {**saved, "actor": {**saved["actor"], "n_step": 0}}})


def test_a_resume_takes_the_learners_device_options_from_the_command_line(tmp_path):
    # A run made on a GPU with --learner.cuda-graph True resumes on a CPU: the device and its
    # speed options belong to the invocation, as --learner.device does
    import dataclasses

    saved = TrainConfig()
    saved = dataclasses.replace(
        saved, learner=dataclasses.replace(saved.learner, device="cuda", cuda_graph=True)
    )
    requested = TrainConfig()
    requested = dataclasses.replace(
        requested, learner=dataclasses.replace(requested.learner, device="cpu", cuda_graph=False)
    )
    given = {"learner.device", "learner.cuda_graph"}
    _check_no_contradiction(requested, saved, tmp_path, given)  # no contradiction
    resumed = _with_invocation(saved, requested)
    assert (resumed.learner.device, resumed.learner.cuda_graph) == ("cpu", False)
