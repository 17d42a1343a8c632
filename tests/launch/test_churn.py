"""`mario churn`: greedy changes and action gaps between kept rounds, against hand-computed
numbers (the e2e file runs it on a real run's rounds and replay)."""

import pathlib
import re

import numpy as np
import pytest

from launch.churn import ChurnConfig, round_row

# Four states, three actions. The previous round's greedy actions are 0, 1, 2, 0.
PREVIOUS = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 5.0], [1.0, 0.5, 0.0]])


@pytest.mark.parametrize(
    ("q", "changed", "gaps"),
    [
        # the same values: nothing changed; gaps 2, 1, 5, 0.5
        (PREVIOUS, 0.0, [2.0, 1.0, 5.0, 0.5]),
        # the last state's best two swap (1 > 0.5, then 1 < 1.05): 1 of 4 changed, its gap 0.05
        ([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 5.0], [1.0, 1.05, 0.0]], 0.25,
         [2.0, 1.0, 5.0, 0.05]),
        # every greedy action moves to the next action; gaps 0.5, 0.01, 1, 0.02
        ([[1.0, 1.5, 0.0], [0.0, 1.0, 1.01], [2.0, 0.0, 1.0], [0.0, 0.1, 0.12]], 1.0,
         [0.5, 0.01, 1.0, 0.02]),
    ],
)  # fmt: skip
def test_a_rounds_changes_and_gaps(q, changed, gaps):
    row = round_row(np.array(q), PREVIOUS, small_gap=0.1)
    assert row["greedy_changed"] == pytest.approx(changed)
    assert row["gap_mean"] == pytest.approx(np.mean(gaps))
    assert row["gap_median"] == pytest.approx(np.median(gaps))
    assert row["small_gap_share"] == pytest.approx(np.mean(np.array(gaps) < 0.1))
    assert row["max_q_mean"] == pytest.approx(np.mean(np.max(q, axis=1)))


def test_the_first_round_has_no_change_to_count():
    row = round_row(PREVIOUS, None, small_gap=1.0)
    assert row["greedy_changed"] is None
    assert row["small_gap_share"] == pytest.approx(0.25)  # only 0.5 is under 1.0


@pytest.mark.parametrize(
    ("flags", "message"),
    [({"states": 0}, "states (0) must be >= 1"),
     ({"small_gap": 0.0}, "small_gap (0.0) must be > 0"),
     ({"out": "x.txt"}, "out x.txt does not end in .json")],
)  # fmt: skip
def test_bad_settings_are_refused_by_name(tmp_path, flags, message):
    flags = {k: pathlib.Path(v) if k == "out" else v for k, v in flags.items()}
    with pytest.raises(ValueError, match=re.escape(message)):
        ChurnConfig(run_dir=tmp_path, **flags)
