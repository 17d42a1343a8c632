"""The tutorial's grid world: both algorithms find the single diagonal route."""

import numpy as np
import pytest
from PIL import Image

from launch.cli import main
from launch.grid_world import GridConfig, GridWorld, greedy_path, rolling_mean, run, train


@pytest.mark.parametrize(
    ("state", "action", "expected"),
    [
        (0, 3, (4, -1.0, False)),  # ↘ from the start
        (4, 3, (8, 0.0, True)),  # ↘ onto the goal pays 0 and ends
        (0, 0, (0, -1.0, False)),  # ↑ off the grid stays put
        (0, 7, (0, -1.0, False)),  # ↖ off the grid stays put
        (5, 4, (8, 0.0, True)),  # ↓ onto the goal
        (2, 5, (4, -1.0, False)),  # ↙ from the top-right corner
    ],
)
def test_grid_transitions(state, action, expected):
    assert GridWorld(3).step(state, action) == expected


@pytest.mark.parametrize("algorithm", ["q_learning", "double_q_learning"])
def test_greedy_path_is_the_diagonal(algorithm, tmp_path):
    q, returns = train(GridConfig(out=tmp_path), algorithm)
    path, total = greedy_path(q)
    assert path == [0, 4, 8]
    assert total == -1.0
    assert returns.shape == (2000,)
    assert returns[-100:].mean() > returns[:20].mean()  # it learned


def test_run_writes_a_valid_png(tmp_path):
    results, plot = run(GridConfig(episodes=300, out=tmp_path))
    assert set(results) == {"q_learning", "double_q_learning"}
    with Image.open(plot) as image:
        assert image.format == "PNG"
        assert image.size[0] > 100 and image.size[1] > 100


def test_cli_grid(tmp_path, capsys):
    main(["grid", "--episodes", "500", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "↘" in printed and "G" in printed
    assert (tmp_path / "grid_rewards.png").exists()


def test_rolling_mean_by_hand():
    np.testing.assert_allclose(rolling_mean(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1, 2, 4, 6])


def test_bad_grid_config_names_value():
    with pytest.raises(ValueError, match=r"episodes \(0\)"):
        GridConfig(episodes=0)
