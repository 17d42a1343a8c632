"""`mario plot`: the learning curve, with the in-training evaluation."""

import gzip
import json

import pytest
from PIL import Image

from launch.cli import main
from launch.plots import (
    ArchiveConfig,
    branch_points,
    describe_milestones,
    eval_curve,
    eval_table,
    load_metrics,
    milestones,
    without_lost_work,
)

RECORDS = [
    {"step": 10, "episode/x_pos": 300, "episode/return": 5.0},
    {"step": 120, "eval/env_steps": 100, "eval/flag_rate": 0.1, "eval/x_pos_mean": 900.0},
    {"step": 20, "learner/loss": 0.5},
    {"step": 60, "eval/env_steps": 50, "eval/flag_rate": 0.0, "eval/x_pos_mean": 400.0},
    {"step": 30, "episode/x_pos": 700, "episode/return": 9.0},
]


def test_eval_curve_is_the_rounds_in_env_step_order():
    assert eval_curve(RECORDS) == [(50, 0.0, 400.0), (100, 0.1, 900.0)]
    assert eval_curve([r for r in RECORDS if "eval/flag_rate" not in r]) == []


def test_branch_points_are_where_a_run_was_branched_from_another(tmp_path):
    assert branch_points(tmp_path) == []  # no invocations.jsonl
    lines = [{"start_env_steps": 0, "command": ["mario", "train"]},
             {"start_env_steps": 787120, "branched_from": "/runs/default-1"},
             {"start_env_steps": 800000}]  # fmt: skip
    (tmp_path / "invocations.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n{torn")
    assert branch_points(tmp_path) == [(787120, "default-1")]


def test_plot_draws_four_panels_from_a_run(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, RECORDS)) + "\n{torn")
    branched = {"start_env_steps": 60, "branched_from": "/runs/parent"}
    (tmp_path / "invocations.jsonl").write_text(json.dumps(branched) + "\n")
    out = tmp_path / "curve.png"
    main(["plot", str(tmp_path), "--out", str(out)])
    with Image.open(out) as image:
        assert image.size == (1170, 720)  # 13 × 8 inches at 90 dpi: the 2 × 2 panels


def test_milestones_give_the_first_round_past_each_flag_rate_and_its_wall_time():
    records = [
        {"step": 0, "counters/env_steps": 0, "elapsed_s": 0.0},
        {"step": 1000, "counters/env_steps": 1000, "elapsed_s": 100.0},
        {"step": 3000, "counters/env_steps": 3000, "elapsed_s": 500.0},
        {"step": 1100, "eval/env_steps": 1000, "eval/flag_rate": 0.0, "eval/x_pos_mean": 1.0},
        {"step": 2100, "eval/env_steps": 2000, "eval/flag_rate": 0.2, "eval/x_pos_mean": 2.0},
        {"step": 3100, "eval/env_steps": 3000, "eval/flag_rate": 0.9, "eval/x_pos_mean": 3.0},
    ]
    reached = milestones(records)
    assert reached == {
        "flag_rate > 0": {"env_steps": 2000, "elapsed_s": 300.0},  # halfway from 100 s to 500 s
        "flag_rate > 0.5": {"env_steps": 3000, "elapsed_s": 500.0},
        "flag_rate >= 0.9": {"env_steps": 3000, "elapsed_s": 500.0},
    }
    assert (
        describe_milestones(reached)[0] == "flag_rate > 0: 2,000 env steps, 0 h 05 min of training"
    )
    assert milestones(records[:4])["flag_rate > 0"] is None
    assert describe_milestones(milestones(records[:4]))[1] == "flag_rate > 0.5: not reached"


def test_milestones_ignore_the_work_a_crash_lost():
    # A session evaluated at 2,000 (flag rate 0.6) and logged up to 3,000 env steps, then died;
    # the run resumed from its checkpoint at 1,000 and logged those steps again: the lost
    # session's round does not count, and the wall time is the resumed session's.
    records = [
        {"step": 1000, "counters/env_steps": 1000, "elapsed_s": 100.0},
        {"step": 2100, "eval/env_steps": 2000, "eval/flag_rate": 0.6, "eval/x_pos_mean": 2.0},
        {"step": 3000, "counters/env_steps": 3000, "elapsed_s": 300.0},
        {"step": 1000, "counters/env_steps": 1000, "elapsed_s": 100.0},
        {"step": 2000, "counters/env_steps": 2000, "elapsed_s": 400.0},
        {"step": 2100, "eval/env_steps": 2000, "eval/flag_rate": 0.2, "eval/x_pos_mean": 2.0},
        {"step": 3000, "counters/env_steps": 3000, "elapsed_s": 600.0},
    ]
    assert milestones(records) == {
        "flag_rate > 0": {"env_steps": 2000, "elapsed_s": 400.0},
        "flag_rate > 0.5": None,
        "flag_rate >= 0.9": None,
    }


def test_a_round_logged_at_the_step_of_the_next_counters_is_kept():
    # The driver logs a round and then its counters at the same env step (seen in a real run:
    # the round of 1,350,120 was dropped from the table and the milestones before this fix).
    records = [
        {"step": 1000, "counters/env_steps": 1000, "elapsed_s": 60.0},
        {"step": 1500, "episode/x_pos": 700, "episode/return": 9.0},
        {"step": 1500, "eval/env_steps": 1400, "eval/flag_rate": 0.3, "eval/x_pos_mean": 2.0},
        {"step": 1500, "counters/env_steps": 1500, "elapsed_s": 120.0},
        {"step": 1500, "counters/env_steps": 1500, "elapsed_s": 120.0},  # a resume's first
    ]
    assert without_lost_work(records) == records[:4]
    assert milestones(records)["flag_rate > 0"] == {"env_steps": 1400, "elapsed_s": 108.0}


def test_eval_table_lists_each_round_with_its_wall_time():
    records = [
        {"step": 1000, "counters/env_steps": 1000, "elapsed_s": 60.0},
        {"step": 1500, "eval/env_steps": 1400, "eval/policy_version": 120, "eval/flag_rate": 0.3,
         "eval/x_pos_mean": 1234.5, "eval/x_pos_median": 1100.0, "eval/x_pos_max": 3161},
        {"step": 1500, "counters/env_steps": 1500, "elapsed_s": 180.0},
        {"step": 600, "eval/env_steps": 500, "eval/flag_rate": 0.0, "eval/x_pos_mean": 296.0},
        {"step": 2100, "eval/env_steps": 2000, "eval/policy_version": 170, "eval/flag_rate": 0.9,
         "eval/x_pos_mean": 3000.0, "eval/x_pos_median": 3161.0, "eval/x_pos_max": 3161,
         "eval_online/flag_rate": 0.6, "eval_online/x_pos_mean": 2500.0},  # an EMA's round
    ]  # fmt: skip
    assert eval_table(records)[2:] == [
        "| 500 | ? | 0.00 | 296 / nan / ? | 1 |",
        "| 1,400 | 120 | 0.30 | 1,234 / 1,100 / 3,161 | 3 |",
        "| 2,000 | 170 | 0.90 (online 0.60) | 3,000 / 3,161 / 3,161 | ? |",
        "| rounds of both: 1 | | mean 0.90 (online 0.60) | | |",
    ]


RUN = [  # a run's records as the trainer logs them: progress (with the learner's), episodes, eval
    {"step": 0, "counters/env_steps": 0, "elapsed_s": 0.0, "learner/loss": 0.9, "replay/size": 1},
    {"step": 10, "episode/x_pos": 300, "episode/return": 5.0, "episode/actor": 0},
    {"step": 1000, "counters/env_steps": 1000, "elapsed_s": 100.0, "learner/loss": 0.5,
     "counters/updates": 40, "learner/mean_q": 1.5},
    {"step": 1100, "eval/env_steps": 1000, "eval/flag_rate": 0.6, "eval/x_pos_mean": 2500.0,
     "eval/x_pos_median": 3161.0, "eval/x_pos_max": 3161, "eval/policy_version": 40,
     "eval/video": "eval/best-000001000.mp4", "eval_online/flag_rate": 0.4},
    {"step": 1200, "episode/x_pos": 3161, "episode/return": 90.0, "episode/flag_get": True},
    {"step": 2000, "counters/env_steps": 2000, "elapsed_s": 200.0, "learner/loss": 0.4},
]  # fmt: skip


def test_an_archive_plots_and_tables_like_its_run(tmp_path, capsys):
    run = tmp_path / "default-9"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(map(json.dumps, RUN)) + "\n")
    branched = {"start_env_steps": 1000, "branched_from": "/runs/parent", "commit": "abc"}
    (run / "invocations.jsonl").write_text(json.dumps(branched) + "\n")
    archives = tmp_path / "archives"
    main(["archive", str(run), "--out", str(archives)])
    path = archives / "default-9.jsonl.gz"
    first = path.read_bytes()
    kept = load_metrics(path)
    assert len(kept) == len(RUN)  # the learner's other numbers, replay's, the video: left out
    assert {k for r in kept for k in r} == {
        "step", "counters/env_steps", "elapsed_s", "learner/loss", "counters/updates",
        "episode/x_pos", "episode/return", "episode/flag_get", "eval/env_steps",
        "eval/flag_rate", "eval/x_pos_mean", "eval/x_pos_median", "eval/x_pos_max",
        "eval/policy_version", "eval_online/flag_rate"}  # fmt: skip
    assert eval_table(kept) == eval_table(load_metrics(run))
    assert milestones(kept) == milestones(load_metrics(run))
    assert branch_points(path) == branch_points(run) == [(1000, "parent")]
    main(["plot", str(path), "--out", str(tmp_path / "from-archive.png")])
    with Image.open(tmp_path / "from-archive.png") as image:
        assert image.size == (1170, 720)
    assert "default-9.jsonl.gz: greedy evaluation first at flag_rate > 0: 1,000" in (
        capsys.readouterr().out.replace("\n", "")
    )
    main(["archive", str(run), "--out", str(archives)])
    assert path.read_bytes() == first  # the same records give the same bytes
    # a run begun again (fewer env steps) does not overwrite its archive
    (run / "metrics.jsonl").write_text(json.dumps(RUN[0]) + "\n")
    main(["archive", str(run), "--out", str(archives)])
    assert path.read_bytes() == first


def test_archive_refuses_a_folder_that_is_no_run_and_two_runs_of_one_name(tmp_path):
    with pytest.raises(ValueError, match=f"run_dirs: {tmp_path} holds no metrics.jsonl"):
        ArchiveConfig(run_dirs=(tmp_path,))
    for parent in ("a", "b"):
        (tmp_path / parent / "run").mkdir(parents=True)
        (tmp_path / parent / "run" / "metrics.jsonl").write_text(json.dumps(RUN[0]) + "\n")
    with pytest.raises(ValueError, match=r"are both named 'run\.jsonl\.gz'"):
        ArchiveConfig(run_dirs=(tmp_path / "a" / "run", tmp_path / "b" / "run"))


def test_archives_without_returns_and_old_runs_plot(tmp_path, monkeypatch):
    # The ablation's archives before 2026-11-27 kept no return or loss; runs before
    # 2026-11-24 logged episodes as episode/max_x_pos and episode/episode_return.
    old_run = tmp_path / "old-run"
    old_run.mkdir()
    old = [RUN[0], {"step": 10, "episode/max_x_pos": 300, "episode/episode_return": 5.0}]
    (old_run / "metrics.jsonl").write_text("\n".join(map(json.dumps, old)) + "\n")
    main(["archive", str(old_run), "--out", str(tmp_path)])
    kept = load_metrics(tmp_path / "old-run.jsonl.gz")
    assert kept[1] == {"step": 10, "episode/x_pos": 300, "episode/return": 5.0}
    row = tmp_path / "row.jsonl.gz"
    with gzip.open(row, "wt") as file:
        file.write(json.dumps({"step": 10, "episode/x_pos": 300, "episode/flag_get": False}))
    monkeypatch.chdir(tmp_path)
    main(["plot", str(row)])  # the default PNG: runs/plots/<name>.png, not beside the archive
    with Image.open(tmp_path / "runs" / "plots" / "row.png") as image:
        assert image.size == (1170, 720)


def test_a_missing_or_damaged_archive_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no archive .*typo\.jsonl\.gz"):
        load_metrics(tmp_path / "typo.jsonl.gz")
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match=r"bad\.jsonl\.gz is no readable archive"):
        load_metrics(tmp_path / "bad.jsonl.gz")


def test_paired_episodes_count_each_seed_of_the_rounds_that_played_both_nets(tmp_path):
    from launch.plots import paired_episodes
    from learner.checkpoint import round_name, save_checkpoint

    def round_file(steps, average, online=None):
        episodes = lambda flags: [{"seed": 100 + i, "flag_get": f} for i, f in enumerate(flags)]  # noqa: E731
        evaluation = {"env_steps": steps, "per_episode": episodes(average)}
        if online is not None:
            evaluation["online"] = {"flag_rate": 0.0, "per_episode": episodes(online)}
        payload = {"learner": {}, "config": {}, "counters": {}, "eval": evaluation}
        save_checkpoint(tmp_path / "eval", payload, name=round_name(steps))

    assert paired_episodes(tmp_path) is None  # no round kept
    round_file(100, [True, True, False, False], [True, False, True, False])  # 1 of each kind
    round_file(200, [True, False])  # the online net not played: left out
    round_file(300, [True, True, True], [False, False, False])  # 3 only the average flagged
    (tmp_path / "eval" / "round-000000400.pt").write_bytes(b"damaged")  # left out
    (tmp_path / "eval" / "round-copy.pt").write_bytes(b"not a round")  # left out
    # 4 against 1 differ: two-sided exact p = 2 * (C(5,0) + C(5,1)) / 2**5 = 0.375
    assert paired_episodes(tmp_path) == {"rounds": 2, "only_average": 4, "only_online": 1,
                                         "both": 1, "neither": 1, "sign_test_p": 0.375}  # fmt: skip
