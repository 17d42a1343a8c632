"""`mario pick`: the best kept rounds, played with more episodes on new seeds, ranked."""

import json
import re

import pytest
import torch

from common.config import config_to_dict
from common.networks import build_network
from launch.cli import main
from launch.config import TrainConfig
from launch.pick import (
    PickConfig,
    candidates,
    combined,
    held_out_seed,
    pick,
    ranked,
    round_summaries,
)
from learner.checkpoint import (
    CheckpointError,
    averaged_round,
    kept_rounds,
    round_name,
    round_window,
    save_checkpoint,
)


def _round(env_steps, flag_rate, x_pos_mean):
    return {"path": f"r{env_steps}", "env_steps": env_steps, "train_flag_rate": flag_rate,
            "train_x_pos_mean": x_pos_mean}  # fmt: skip


@pytest.mark.parametrize(
    ("rounds", "top", "chosen"),
    [
        # flag rate first, then mean max x
        ([(100, 0.5, 900), (200, 0.9, 500), (300, 0.5, 950)], 2, [200, 300]),
        # a tie: the later round first
        ([(100, 1.0, 3161), (200, 1.0, 3161), (300, 0.9, 3200)], 2, [200, 100]),
        # fewer rounds than asked for: all of them
        ([(100, 0.0, 300)], 3, [100]),
    ],
)
def test_candidates_are_the_best_rounds_of_training(rounds, top, chosen):
    got = candidates([_round(*r) for r in rounds], top)
    assert [r["env_steps"] for r in got] == chosen


@pytest.mark.parametrize(
    ("centre", "width", "window"),
    [(200, 3, [100, 200, 300]), (100, 3, [100, 200]), (400, 3, [300, 400]), (300, 1, [300]),
     (300, 3, [200, 300, 400])],
)  # fmt: skip
def test_a_window_of_rounds_is_centred_and_cut_at_the_ends(centre, width, window):
    assert round_window([100, 200, 300, 400], centre, width) == window


@pytest.mark.parametrize(("width", "message"), [
    (2, "average (2) must be an odd number >= 1"), (0, "average (0) must be an odd number >= 1"),
    (5, "average (5) is more than the 4 usable rounds")])  # fmt: skip
def test_a_bad_window_is_named(width, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        round_window([100, 200, 300, 400], 200, width)


def test_averaged_candidates_rank_by_their_windows_training_evaluations():
    # flag rates 0, 1, 0, .8, .8, .8: alone the round at 200 is best; with its neighbours
    # (mean 1/3) it is not: 600 (mean .8 of 500 and 600) before 500 (.8, the earlier)
    rounds = [_round(s, f, 1000) for s, f in
              ((100, 0.0), (200, 1.0), (300, 0.0), (400, 0.8), (500, 0.8), (600, 0.8))]  # fmt: skip
    assert [r["env_steps"] for r in candidates(rounds, 2)] == [200, 600]
    assert [r["env_steps"] for r in candidates(rounds, 2, average=3)] == [600, 500]


def test_averaged_weights_are_the_mean_of_the_window(tmp_path):
    for steps, value in ((100, 1.0), (200, 2.0), (300, 6.0)):
        _save_round(tmp_path, steps, 0.5, 1000, seed=0)
        path = tmp_path / "eval" / round_name(steps)
        payload = torch.load(path, weights_only=True)
        online = payload["learner"]["online"]
        payload["learner"]["online"] = {k: torch.full_like(t, value) for k, t in online.items()}
        torch.save(payload, path)
    rounds = kept_rounds(tmp_path)
    payload = averaged_round(rounds, 200, 3)
    assert payload["averaged_rounds"] == [100, 200, 300] and payload["eval"]["env_steps"] == 200
    assert all(torch.all(t == 3.0) for t in payload["learner"]["online"].values())
    assert all(torch.all(t == 1.5) for t in averaged_round(rounds, 100, 3)["learner"]["online"]
               .values())  # fmt: skip
    with pytest.raises(CheckpointError, match=r"round \(250\): no kept round weights at 250"):
        averaged_round(rounds, 250, 3)
    other = torch.load(rounds[300], weights_only=True)
    first = next(iter(other["learner"]["online"]))
    other["learner"]["online"][first] = torch.zeros(3)  # another network's
    torch.save(other, rounds[300])
    with pytest.raises(
        CheckpointError, match=r"round-000000300\.pt: its weights \(torso\.0\.weight\) do not fit"
    ):
        averaged_round(rounds, 200, 3)


def _summary(*episodes):
    """`evaluate`'s summary of episodes given as (flag, max x)."""
    per_episode = [{"flag_get": flag, "max_x_pos": x} for flag, x in episodes]
    return {
        "per_episode": per_episode,
        "max_x_pos_mean": sum(x for _, x in episodes) / len(episodes),
    }


def test_rounds_are_ranked_by_their_new_episodes_not_by_training():
    # (env steps, training flag rate): the training order is the reverse of the result's
    evaluated = {
        100: ({7: _summary((1, 3161), (0, 1000)), 100: _summary((1, 3161), (1, 3161))}, 0.9),
        200: ({7: _summary((1, 3161), (1, 3161)), 100: _summary((0, 2000), (1, 3161))}, 0.8),
        300: ({7: _summary((1, 3161), (1, 3161)), 100: _summary((0, 3000), (0, 3000))}, 0.7),
        50: ({7: _summary((1, 3161), (0, 1000)), 100: _summary((1, 3161), (1, 3161))}, 0.6),
    }
    results = []
    for env_steps, (summaries, flag_rate) in evaluated.items():
        folders = {seed: f"f{env_steps}-{seed}" for seed in summaries}
        results.append(combined(_round(env_steps, flag_rate, 1000), summaries, folders))
    by_steps = {r["env_steps"]: r for r in results}
    # hand-computed: flags over the 4 episodes, mean max x over the 4 (not a mean of means)
    assert by_steps[100]["flags"] == 3 and by_steps[100]["x_pos_mean"] == 10483 / 4
    assert by_steps[200]["flags"] == 3 and by_steps[200]["x_pos_mean"] == 11483 / 4
    assert by_steps[300]["flags"] == 2 and by_steps[300]["x_pos_mean"] == 12322 / 4
    assert by_steps[100]["per_seed"] == {
        "7": {"flags": 1, "x_pos_mean": 2080.5, "out": "f100-7"},
        "100": {"flags": 2, "x_pos_mean": 3161.0, "out": "f100-100"},
    }
    assert by_steps[100]["episodes"] == 4
    # flags, then mean max x, then the later of two equal rounds (100 before 50)
    assert [r["env_steps"] for r in ranked(results)] == [200, 100, 50, 300]


@pytest.mark.parametrize(
    ("seeds", "episodes", "wanted", "first"),
    [
        ((1000, 2000), 20, 20, 3000),  # pick's defaults: export plays 3000…3019
        ((1000,), 20, 20, 2000),
        ((7, 100), 2, 20, 1000),
        ((990,), 20, 20, 2000),  # 990…1009 shares 1000…1009
        ((1000, 2000, 3000), 1500, 20, 5000),  # 3000…4499 rules out 4000
    ],
)
def test_the_export_seed_is_held_out_from_the_sets_that_chose(seeds, episodes, wanted, first):
    assert held_out_seed(seeds, episodes, wanted) == first


def _save_round(run_dir, env_steps, flag_rate, x_pos_mean, seed):
    config = TrainConfig()
    torch.manual_seed(seed)
    network = build_network(config.network, config.env.num_actions, config.env.frame_stack)
    config_dict = config_to_dict(config)
    config_dict["env"]["max_episode_steps"] = 15  # short episodes: the test plays many
    save_checkpoint(run_dir / "eval", {
        "learner": {"online": network.state_dict(), "updates": env_steps // 8},
        "config": config_dict,
        "counters": {"env_steps": env_steps, "updates": env_steps // 8, "elapsed_s": 1.0},
        "eval": {"env_steps": env_steps, "policy_version": env_steps // 8,
                 "flag_rate": flag_rate, "x_pos_mean": x_pos_mean, "per_episode": []},
    }, name=round_name(env_steps))  # fmt: skip


def test_pick_plays_the_best_rounds_on_each_seed_set_and_ranks_them(tmp_path, capsys):
    run_dir = tmp_path / "run[x]"  # [x] is printed as is, not taken for markup
    for env_steps, flag_rate, x_pos_mean in ((50_000, 0.1, 900), (100_000, 0.3, 800),
                                             (150_000, 0.2, 1200)):  # fmt: skip
        _save_round(run_dir, env_steps, flag_rate, x_pos_mean, seed=env_steps)
    main(["pick", str(run_dir), "--top", "2", "--episodes", "2", "--seeds", "7", "100"])
    printed = capsys.readouterr().out
    result = json.loads((run_dir / "eval" / "pick.json").read_text())
    ranked = result["ranked"]
    # the two best by training's evaluation (30 % and 20 %), not the 10 % round
    assert sorted(r["env_steps"] for r in ranked) == [100_000, 150_000]
    for row in ranked:
        assert row["episodes"] == 4 and set(row["per_seed"]) == {"7", "100"}
        assert row["flags"] == sum(s["flags"] for s in row["per_seed"].values())
        folder = run_dir / "eval" / "pick" / f"round-{row['env_steps']:09d}-seed-7"
        assert row["per_seed"]["7"]["out"] == str(folder)
        played = json.loads((folder / "eval.json").read_text())
        assert [e["seed"] for e in played["per_episode"]] == [7, 8]
        assert played["checkpoint"].endswith(round_name(row["env_steps"]))
    keys = [(r["flags"], r["x_pos_mean"], r["env_steps"]) for r in ranked]
    assert keys == sorted(keys, reverse=True)
    assert result["export"] == (
        f"mario export '{run_dir}' --round {ranked[0]['env_steps']} --seed 1000"
    )
    assert result["export"] in printed and f"written: {run_dir}/eval/pick.json" in printed


def test_pick_can_play_each_candidate_as_the_mean_of_its_neighbours(tmp_path):
    # windows' means: 50k .3, 100k .367, 150k .333, 200k .25
    for env_steps, flag_rate in ((50_000, 0.1), (100_000, 0.5), (150_000, 0.5), (200_000, 0.0)):
        _save_round(tmp_path, env_steps, flag_rate, 1000, seed=env_steps)
    main(["pick", str(tmp_path), "--top", "1", "--episodes", "1", "--seeds", "7",
          "--average", "3"])  # fmt: skip
    result = json.loads((tmp_path / "eval" / "pick.json").read_text())
    (row,) = result["ranked"]
    assert row["env_steps"] == 100_000 and row["averaged_rounds"] == [50_000, 100_000, 150_000]
    played = json.loads((tmp_path / "eval" / "pick" / "average-3-000100000-seed-7" / "eval.json")
                        .read_text())  # fmt: skip
    assert played["checkpoint"].endswith("average-3-000100000.pt")
    assert result["average"] == 3 and " --round 100000 --average 3 --seed " in result["export"]


def test_pick_and_export_average_the_same_rounds_when_one_is_damaged(tmp_path, capsys):
    # usable: 50k .0, 100k .8, 200k .8, 250k .0 (150k cut short): windows' means 50k .4,
    # 100k .533, 200k .533 (the later first), 250k .4
    for env_steps, flag_rate in ((50_000, 0.0), (100_000, 0.8), (150_000, 0.8), (200_000, 0.8),
                                 (250_000, 0.0)):  # fmt: skip
        _save_round(tmp_path, env_steps, flag_rate, 1000, seed=env_steps)
    damaged = tmp_path / "eval" / round_name(150_000)
    damaged.write_bytes(damaged.read_bytes()[:1000])
    with pytest.raises(SystemExit):
        main(["pick", str(tmp_path), "--average", "5", "--episodes", "1", "--seeds", "7"])
    assert "average (5) is more than the 4 usable rounds" in " ".join(
        capsys.readouterr().out.split()
    )
    main(["pick", str(tmp_path), "--top", "1", "--episodes", "1", "--seeds", "7",
          "--average", "3"])  # fmt: skip
    (row,) = json.loads((tmp_path / "eval" / "pick.json").read_text())["ranked"]
    assert row["env_steps"] == 200_000 and row["averaged_rounds"] == [100_000, 200_000, 250_000]
    assert row["train_window_flag_rate"] == pytest.approx(1.6 / 3)
    out = tmp_path / "model"
    main(["export", str(tmp_path), "--round", "200000", "--average", "3", "--out", str(out),
          "--eval-episodes", "0"])  # fmt: skip
    card = json.loads((out / "model_card.json").read_text())
    assert card["averaged_rounds"] == row["averaged_rounds"]


def test_a_file_not_named_as_a_round_is_not_taken_for_one(tmp_path):
    _save_round(tmp_path, 5, 0.0, 100, seed=0)
    (tmp_path / "eval" / "round-copy.pt").write_bytes(b"")
    assert [r["env_steps"] for r in round_summaries(tmp_path)[0]] == [5]


def test_a_file_in_eval_that_is_not_a_round_is_named(tmp_path):
    _save_round(tmp_path, 5, 0.0, 100, seed=0)
    path = tmp_path / "eval" / round_name(5)
    payload = torch.load(path, weights_only=True)
    del payload["eval"]  # a checkpoint, but not of a round
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"no usable round file: .*round-000000005\.pt: "
                       "no evaluation summary"):  # fmt: skip
        round_summaries(tmp_path)
    with pytest.raises(CheckpointError, match="no evaluation summary"):
        pick(PickConfig(tmp_path))


def test_a_round_that_cannot_be_read_is_left_out_and_named_and_the_rest_picked(tmp_path, capsys):
    for env_steps in (50_000, 100_000):
        _save_round(tmp_path, env_steps, 0.5, 1000, seed=env_steps)
    damaged = tmp_path / "eval" / round_name(100_000)
    damaged.write_bytes(damaged.read_bytes()[:1000])  # cut short: a disk that filled up
    main(["pick", str(tmp_path), "--top", "2", "--episodes", "1", "--seeds", "7"])
    result = json.loads((tmp_path / "eval" / "pick.json").read_text())
    assert [r["env_steps"] for r in result["ranked"]] == [50_000]
    assert list(result["left_out"]) == [str(damaged)]
    printed = " ".join(capsys.readouterr().out.split())
    assert f"left out: cannot load checkpoint {damaged}: " in printed
