"""The ablation's row commands and its report, against hand-written metric records."""

import dataclasses
import json
import pathlib

import pytest

from launch import ablation
from launch.cli import main
from launch.config import TrainConfig


def _eval(step, flag_rate, x_mean):
    return {"step": step, "eval/env_steps": step, "eval/flag_rate": flag_rate,
            "eval/x_pos_mean": x_mean, "eval/x_pos_median": x_mean - 1}  # fmt: skip


def _episode(step, x_pos, flag=0):
    return {"step": step, "episode/x_pos": x_pos, "episode/flag_get": flag}


def _progress(env_steps, updates, elapsed_s):
    return {"step": env_steps, "counters/env_steps": env_steps, "counters/updates": updates,
            "elapsed_s": elapsed_s}  # fmt: skip


RECORDS = [
    _episode(10, 300), _episode(20, 700), _progress(50, 4, 60.0), _eval(52, 0.0, 400.0),
    _episode(80, 3161, flag=1), _eval(100, 0.5, 2000.0), _progress(100, 9, 120.0),
    _eval(103, 0.2, 2500.0), _episode(110, 900), _progress(120, 11, 150.0), _eval(150, 1.0, 3161),
]  # fmt: skip


@pytest.mark.parametrize(
    "budget, final_step, best_step, flags, episodes, x_last, updates, minutes, rounds_mean",
    [
        # the first eval at or past the budget is the row's; best is the best up to it; the
        # mean of the rounds up to it: (0 + 0.5) / 2, (400 + 2000) / 2; (0 + 0.5 + 0.2) / 3, …
        (100, 100, 100, 1, 3, (300 + 700 + 3161) / 3, 9, 2.0, (0.25, 1200.0)),
        (101, 103, 100, 1, 3, (300 + 700 + 3161) / 3, 9, 2.0, (0.7 / 3, 4900 / 3)),
        (50, 52, 52, 0, 2, 500.0, 4, 1.0, (0.0, 400.0)),
    ],
)
def test_row_result_takes_the_evaluation_at_the_budget(
    budget, final_step, best_step, flags, episodes, x_last, updates, minutes, rounds_mean
):
    result = ablation.row_result(RECORDS, budget)
    assert result["rounds_mean"] == pytest.approx(rounds_mean)
    assert result["done"] and result["final"]["eval/env_steps"] == final_step
    assert result["best"]["eval/env_steps"] == best_step
    assert (result["train_flags"], result["train_episodes"]) == (flags, episodes)
    assert result["train_x_mean_last_100"] == pytest.approx(x_last)
    assert (result["updates"], result["minutes"]) == (updates, minutes)


@pytest.mark.parametrize(
    ("budget", "bins", "expected"),
    [
        # spans (0, 60], (60, 120]: episodes ending at 10, 20 | 80 (flag), 110
        (120, 2, [(0, 2, 500.0), (1, 2, (3161 + 900) / 2)]),
        # spans (0, 50], (50, 100]: 10, 20 | 80; the episode at 110 is past the budget
        (100, 2, [(0, 2, 500.0), (1, 1, 3161.0)]),
        (100, 4, [(0, 2, 500.0), (0, 0, None), (0, 0, None), (1, 1, 3161.0)]),
    ],
)
def test_training_bins_split_the_budget(budget, bins, expected):
    assert ablation.training_bins(RECORDS, budget, bins) == expected


def test_training_table_has_a_line_per_row():
    markdown = ablation.training_table({"base": RECORDS}, 120, bins=2)
    assert markdown.splitlines()[0] == "| row | 0k–0k | 0k–0k |"  # spans of 60 env steps
    assert markdown.splitlines()[2] == "| base | 0 / 2, x 500 | 1 / 2, x 2030 |"
    markdown = ablation.training_table({"base": RECORDS}, 300_000, bins=6)
    assert markdown.splitlines()[0].startswith("| row | 0k–50k | 50k–100k |")
    assert "| base | 1 / 4, x 1265 | 0 / 0, x – |" in markdown


def test_a_row_short_of_the_budget_is_reported_as_not_finished():
    result = ablation.row_result(RECORDS, 200)
    assert not result["done"] and result["env_steps_reached"] == 120
    markdown = ablation.table({"base": result, "dqn": None}, 200)
    assert "| base |" in markdown and "not finished: at 120 env steps" in markdown
    assert "| dqn | DQN: no double-Q" in markdown and "not run" in markdown


def test_report_writes_the_table_and_the_curves(tmp_path):
    for row in ("base", "nature-net"):
        (tmp_path / row).mkdir()
        lines = [json.dumps(r) for r in RECORDS]
        (tmp_path / row / "metrics.jsonl").write_text("\n".join(lines) + "\n{torn")
    out, table_out = tmp_path / "curves.png", tmp_path / "table.md"
    main(["ablation", "report", "--root", str(tmp_path), "--env-steps", "100", "--out", str(out),
          "--table-out", str(table_out), "--rows", "base", "nature-net", "dqn",
          "--archive", str(tmp_path / "no-archive")])  # fmt: skip
    markdown = table_out.read_text()
    assert (
        "| base | run r1's recipe with the narrow net |  | 50% | 2000 / 1999 | "
        "50%, x 2000 (100) | 25% / 1200 (2 rounds) | – | 1 of 3 |"
    ) in markdown
    assert (
        "| dqn | DQN: no double-Q (the tutorial's comparison) | reference | not run |" in markdown
    )
    assert "| nature-net |" in markdown and "| dqn |" in markdown
    assert out.stat().st_size > 10_000


@pytest.mark.parametrize("row", list(ablation.ROWS))
def test_every_row_is_a_valid_train_command_differing_from_its_recipe(row):
    import tyro

    def config_of(name):
        args = ablation.command(name, pathlib.Path("/tmp/rows"), 300_000, 5)
        config = tyro.cli(TrainConfig, args=args[1:])
        assert config.total_env_steps == 300_000
        assert config.run_dir == pathlib.Path("/tmp/rows") / name
        return dataclasses.replace(config, run_dir=pathlib.Path("/tmp/rows/x"))

    config = config_of(row)
    against = ablation.ROWS[row].against
    # a row against no recipe (the tutorial's) differs from both recipes
    recipes = [against] if against != "none" else ["base", "reference"]
    for recipe in recipes:
        assert (config != config_of(recipe)) == (row not in ("base", "reference")), row


def test_the_reference_is_the_base_plus_release_jump_and_the_defaults_add_their_rows():
    import tyro

    base = tyro.cli(TrainConfig, args=list(ablation.BASE))
    assert base != TrainConfig() and not base.env.release_jump
    reference = tyro.cli(TrainConfig, args=list(ablation.REFERENCE))
    assert dataclasses.replace(base, env=dataclasses.replace(base.env, release_jump=True),
                               learner=reference.learner) == reference  # fmt: skip
    assert reference.learner.learning_rate_final == 2.5e-5
    assert reference.actor.explore_repeat_max == 1 and reference != TrainConfig()
    rows = [ablation.ROWS[name] for name in ablation.DEFAULTS_ROWS]
    assert all(row.against == "reference" for row in rows)
    defaults = tyro.cli(
        TrainConfig, args=[*ablation.REFERENCE, *(f for r in rows for f in r.flags)]
    )
    assert defaults == TrainConfig() and TrainConfig().env.graphics == "downsample"
    assert TrainConfig().learner.ema_decay == 0.9998 and reference.learner.ema_decay == 0


def test_the_tutorial_row_is_the_parts_own_defaults():
    import tyro

    from actors.actor import ActorConfig
    from common.config import EnvConfig, NetworkConfig
    from learner.learner import LearnerConfig
    from replay_server.replay import ReplayConfig

    tutorial = tyro.cli(TrainConfig, args=list(ablation.TUTORIAL))
    assert (tutorial.env, tutorial.actor, tutorial.network, tutorial.learner, tutorial.replay) == (
        EnvConfig(),
        ActorConfig(),
        NetworkConfig(),
        LearnerConfig(),
        ReplayConfig(),
    )


def test_unknown_rows_are_named():
    with pytest.raises(ValueError, match=r"rows \['bogus'\] are unknown"):
        ablation.AblationRunConfig(rows=("base", "bogus"))


@pytest.mark.parametrize(
    "status, done",
    [
        ({"last_eval": {"env_steps": 300_020}}, True),
        ({"last_eval": {"env_steps": 250_000}}, False),
        ({"last_eval": None}, False),
        (None, False),
    ],
)
def test_a_row_evaluated_at_its_budget_is_not_run_again(tmp_path, status, done):
    if status is not None:
        (tmp_path / "status.json").write_text(json.dumps(status))
    assert ablation.row_done(tmp_path, 300_000) == done


# max x of five episodes ending at steps 10…50; the 4th took the flag. Means of two: 1000, 1200,
# 1500, 2000 (after episodes 2, 3, 4, 5).
PAIR_EPISODES = [_episode(10, 500), _episode(20, 1500), _episode(30, 900),
                 _episode(40, 2100, flag=1), _episode(50, 1900)]  # fmt: skip


@pytest.mark.parametrize(
    "budget, expected",
    [
        (50, {"first flag": 4, "mean max x ≥ 1,000": 2, "mean max x ≥ 1,500": 4,
              "mean max x ≥ 2,000": 5}),
        (40, {"first flag": 4, "mean max x ≥ 1,000": 2, "mean max x ≥ 1,500": 4,
              "mean max x ≥ 2,000": None}),
        (30, {"first flag": None, "mean max x ≥ 1,000": 2, "mean max x ≥ 1,500": None,
              "mean max x ≥ 2,000": None}),
        (10, {"first flag": None, "mean max x ≥ 1,000": None, "mean max x ≥ 1,500": None,
              "mean max x ≥ 2,000": None}),  # one episode: no mean of two yet
    ],
)  # fmt: skip
def test_episodes_to_each_milestone(budget, expected):
    assert ablation.episodes_to(PAIR_EPISODES, budget, window=2) == expected


def test_report_compares_dqn_with_double_dqn_when_both_ran(tmp_path):
    slow = [_episode(10 * (i + 1), 1100 if i >= 100 else 600) for i in range(200)]  # DQN
    fast = [_episode(10 * (i + 1), 1100 if i >= 50 else 600) for i in range(200)]  # double
    for row, episodes in (("dqn", slow), ("reference", fast)):
        (tmp_path / row).mkdir()
        lines = [json.dumps(r) for r in (*episodes, _eval(2000, 0.0, 900.0))]
        (tmp_path / row / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    pair = tmp_path / "pair.png"
    markdown, _ = ablation.report(ablation.AblationReportConfig(
        root=tmp_path, env_steps=2000, rows=("reference", "dqn"), out=tmp_path / "curves.png",
        pair_out=pair, archive=None))  # fmt: skip
    # a mean of 100 episodes ≥ 1,000 needs 80 of them at 1,100: after episode 100 + 80 (DQN),
    # 50 + 80 (double DQN); neither mean reaches 1,500, neither row took a flag
    assert "| mean max x ≥ 1,000 | 180 | 130 | 1.38 |" in markdown
    assert "| mean max x ≥ 1,500 | – | – | – |" in markdown
    assert "| first flag | – | – | – |" in markdown
    assert pair.stat().st_size > 10_000
    single, _ = ablation.report(ablation.AblationReportConfig(
        root=tmp_path, env_steps=2000, rows=("dqn",), out=tmp_path / "c.png",
        pair_out=tmp_path / "none.png", archive=None))  # fmt: skip
    assert "double DQN" not in single and not (tmp_path / "none.png").exists()


def test_a_row_whose_run_is_gone_is_reported_from_its_archive(tmp_path):
    root, kept = tmp_path / "runs", tmp_path / "kept"
    (root / "base").mkdir(parents=True)
    video = {**_eval(100, 0.5, 2000.0), "eval/video": "eval-100.mp4"}
    others = [{"step": 60, "learner/loss": 0.3}, {"step": 70, "replay/size": 9}]
    records = [*RECORDS[:5], video, *RECORDS[6:], *others]
    (root / "base" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    def report(archive):
        return ablation.report(
            ablation.AblationReportConfig(
                root=root, env_steps=100, rows=("base",), out=tmp_path / "c.png", archive=archive
            )
        )[0]

    invocation = {"command": ["mario", "train"], "commit": "abc"}
    (root / "base" / "invocations.jsonl").write_text(json.dumps(invocation) + "\n")
    before = report(None)
    main(["ablation", "archive", "--root", str(root), "--out", str(kept)])
    path = kept / "base.jsonl.gz"
    first = path.read_bytes()
    assert not first[3] & 0x08  # no file name in the gzip header (the .tmp's would be there)
    main(["ablation", "archive", "--root", str(root), "--out", str(kept), "--rows", "base"])
    assert path.read_bytes() == first  # the same records give the same bytes
    assert [p.name for p in kept.iterdir()] == ["base.jsonl.gz"]  # rows without a run: none
    records_kept = ablation.read_archive(path)
    assert records_kept[-1] == {"invocation": invocation}  # the commit and command stay
    records_kept = records_kept[:-1]
    assert len(records_kept) == len(RECORDS)  # the learner's and the replay's records are left
    assert {k for r in records_kept for k in r} == {
        "step", "elapsed_s", "counters/env_steps", "counters/updates", "episode/x_pos",
        "episode/flag_get", "eval/env_steps", "eval/flag_rate", "eval/x_pos_mean",
        "eval/x_pos_median"}  # fmt: skip
    # a run begun again (shorter) neither overwrites the archive nor hides it from the report
    (root / "base" / "metrics.jsonl").write_text(json.dumps(_progress(20, 1, 5.0)) + "\n")
    main(["ablation", "archive", "--root", str(root), "--out", str(kept)])
    assert path.read_bytes() == first
    assert report(kept) == before
    (root / "base" / "metrics.jsonl").unlink()
    assert (
        "| 50% | 2000 / 1999 | 50%, x 2000 (100) | 25% / 1200 (2 rounds) | – | 1 of 3 |" in before
    )
    assert report(kept) == before
    assert "| base | run r1's recipe with the narrow net |  | not run |" in report(None)


@pytest.mark.parametrize(
    ("row", "same_as_reference"),
    [
        # rewards, a stuck end's label, the graphics and training's sticky actions leave a held
        # action's episodes as they are (the downsample graphics: 13 of 60 and x 1,819 as the
        # reference's, measured in session 17); the jump's release and the stuck rule do not
        ("stuck-truncate", True), ("no-flag-scale", True), ("sticky-train", True),
        ("gamma-0.9", True), ("explore-repeat", True), ("downsample", True),
        ("base", False), ("stuck-40", False), ("stuck-off", False),
        ("right-only", False), ("tutorial", False),
    ],
)  # fmt: skip
def test_rows_share_a_floor_when_their_evaluations_play_alike(row, same_as_reference):
    _, reference = ablation.row_evaluation("reference", 300_000)
    _, key = ablation.row_evaluation(row, 300_000)
    assert (key == reference) is same_as_reference


@pytest.mark.parametrize(
    ("env_steps", "rounds", "last_first_seed"),
    # rounds at 50k, 100k, … and one at the budget; 10 seeds each from 1,000,000,000
    [(300_000, 6, 1_000_000_050), (50_000, 1, 1_000_000_000), (50_001, 2, 1_000_000_010)],
)
def test_a_floor_plays_the_seeds_of_the_rounds_up_to_the_budget(env_steps, rounds, last_first_seed):
    env_config, key = ablation.row_evaluation("reference", env_steps)
    assert len(key["seeds"]) == rounds and key["seeds"][-1][0] == last_first_seed
    assert [len(seeds) for seeds in key["seeds"]] == [10] * rounds
    assert (env_config.sticky_action_prob, env_config.noop_max) == (0.25, 30)  # the evaluation's
    assert "flag_bonus" not in key["env"] and key["env"]["release_jump"] is True


def _entry(actions):
    return {"env": {}, "seeds": [[1, 2], [3, 4]], "rows": ["reference"], "actions": actions}


@pytest.mark.parametrize(
    ("actions", "expected", "cell"),
    [
        # by flags over the rounds, then by mean max x: (1746 + 1886) / 2 = 1816
        ({"right": [{"flags": 0, "x_pos_mean": 296.0}] * 2,
          "right+A": [{"flags": 2, "x_pos_mean": 1746.0}, {"flags": 1, "x_pos_mean": 1886.0}]},
         ("right+A", 3, 4, 1816.0), "75% / 1816 (right+A)"),
        ({"right": [{"flags": 0, "x_pos_mean": 300.0}, {"flags": 0, "x_pos_mean": 500.0}],
          "right+A": [{"flags": 0, "x_pos_mean": 296.0}] * 2},
         ("right", 0, 4, 400.0), "0% / 400 (right)"),
    ],
)  # fmt: skip
def test_the_floor_is_the_best_held_action(actions, expected, cell):
    assert ablation.floor_of(_entry(actions)) == expected
    assert ablation.floor_cell(expected) == cell


@pytest.mark.parametrize(
    ("text", "message"),
    [("[1, 2]", "is not a floor file"), ("{torn", "is not a floor file"),
     ('{"entries": {}}', "is not a floor file: entries is a dict"),
     ('{"entries": [[]]}', "is not a floor file: entry 0 is not an object"),
     ('{"entries": [{"env": {}}]}', r"entry 0 lacks \['actions', 'rows', 'seeds'\]"),
     ('{"entries": [{"env": {}, "seeds": [], "rows": [], "actions": []}]}',
      "entry 0's actions are not"),
     ('{"entries": [{"env": {}, "seeds": [], "rows": [], "actions": {"right": [{"flags": 1}]}}]}',
      "entry 0's actions are not")],
)  # fmt: skip
def test_a_bad_floor_file_is_named(tmp_path, text, message):
    path = tmp_path / "floor.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        ablation.read_floors(path)
    assert str(path) in str(error.value)


def test_floor_holds_each_action_on_the_real_game_and_the_report_prints_the_best(tmp_path):
    """Round 0 of the reference's evaluation (seeds 1,000,000,000 …): right stands at the first
    pipe; right+A jumps whenever Mario lands and reaches the flag in 2 of the 10 (measured in
    session 17 with `mario eval --constant-action 1`)."""
    out = tmp_path / "floor.json"
    main(["ablation", "floor", "--rows", "reference", "stuck-truncate", "--env-steps", "50000",
          "--out", str(out)])  # fmt: skip
    (entry,) = ablation.read_floors(out)  # one entry for both rows: they play alike
    assert entry["rows"] == ["reference", "stuck-truncate"]
    assert entry["actions"]["right"] == [{"flags": 0, "x_pos_mean": pytest.approx(296.2)}]
    assert entry["actions"]["right+A"] == [{"flags": 2, "x_pos_mean": pytest.approx(1745.7)}]
    # measured once: a second call finds the entry (a changed number stays)
    entry["actions"]["right"][0]["x_pos_mean"] = 1.0
    out.write_text(json.dumps({"entries": [entry]}))
    main(["ablation", "floor", "--rows", "stuck-truncate", "--env-steps", "50000", "--out",
          str(out)])  # fmt: skip
    assert ablation.read_floors(out)[0]["actions"]["right"][0]["x_pos_mean"] == 1.0
    root = tmp_path / "runs"
    (root / "reference").mkdir(parents=True)
    records = [_eval(50_000, 0.1, 1200.0), _progress(50_000, 9, 60.0)]
    (root / "reference" / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records)
    )
    markdown, _ = ablation.report(ablation.AblationReportConfig(
        root=root, env_steps=50_000, rows=("reference", "base"), out=tmp_path / "c.png",
        archive=None, floor=out))  # fmt: skip
    assert "| 10% / 1200 (1 rounds) | 20% / 1746 (right+A) | 0 of 0 |" in markdown
    assert "| base | run r1's recipe with the narrow net |  | not run | | | | – |" in markdown


@pytest.mark.parametrize(
    ("eval_steps", "cell"),
    [
        # the schedule's two rounds (50k and the budget): compared with their floor
        ((50_000, 100_000), "| 0% / 400 (right) |"),
        # a round lost (one logged at the budget only): the floor of two rounds is not printed
        ((100_000,), "| 0% / 1000 (1 rounds) | – |"),
        # not finished: the floor of the budget's rounds is printed beside it
        ((50_000,), "| not finished: at 50,000 env steps | | | | 0% / 400 (right) |"),
    ],
)
def test_a_row_is_compared_with_the_floor_of_its_own_rounds(tmp_path, eval_steps, cell):
    _, key = ablation.row_evaluation("base", 100_000)
    rounds = [{"flags": 0, "x_pos_mean": 400.0}] * 2
    entry = {**key, "rows": ["base"], "actions": {"right": rounds, "right+A": rounds}}
    floor = tmp_path / "floor.json"
    floor.write_text(ablation.floor_text([entry]))
    (tmp_path / "base").mkdir()
    records = [r for step in eval_steps for r in (_eval(step, 0.0, 1000.0), _progress(step, 9, 60))]
    (tmp_path / "base" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    markdown, _ = ablation.report(ablation.AblationReportConfig(
        root=tmp_path, env_steps=100_000, rows=("base",), out=tmp_path / "c.png", archive=None,
        floor=floor))  # fmt: skip
    assert cell in markdown
