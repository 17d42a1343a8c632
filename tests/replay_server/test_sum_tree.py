"""Sum-tree sums and prefix-sum search against hand-computed values."""

import numpy as np
import pytest

from replay_server.sum_tree import SumTree


def test_sums_by_hand():
    tree = SumTree(5)  # rounded up to 8 leaves
    tree.set(np.arange(5), np.array([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert tree.size == 8 and tree.total == 15.0
    assert tree.nodes[2] == 10.0 and tree.nodes[3] == 5.0  # leaves 0..3 and 4..7
    tree.set(np.array([1, 1]), np.array([7.0, 0.5]))  # the last write wins
    assert tree.get(np.array([1]))[0] == 0.5 and tree.total == 13.5


@pytest.mark.parametrize(
    ("target", "leaf"),
    # prefix sums of [1, 2, 3, 4]: [0,1) → 0, [1,3) → 1, [3,6) → 2, [6,10) → 3
    [(0.0, 0), (0.99, 0), (1.0, 1), (2.5, 1), (3.0, 2), (5.99, 2), (6.0, 3), (9.99, 3)],
)
def test_find_by_prefix_sum(target, leaf):
    tree = SumTree(4)
    tree.set(np.arange(4), np.array([1.0, 2.0, 3.0, 4.0]))
    assert tree.find(np.array([target]))[0] == leaf


def test_zero_priority_leaves_are_never_found():
    tree = SumTree(6)
    tree.set(np.arange(6), np.array([0.0, 1.0, 0.0, 0.0, 2.0, 0.0]))
    leaves = tree.sample_stratified(1000, np.random.default_rng(0))
    assert set(leaves.tolist()) <= {1, 4}


def test_capacity_one_and_errors():
    tree = SumTree(1)
    tree.set(np.array([0]), np.array([3.0]))
    assert tree.total == 3.0
    assert tree.find(np.array([2.9]))[0] == 0
    with pytest.raises(ValueError, match="capacity"):
        SumTree(0)
    with pytest.raises(ValueError, match="priorities"):
        tree.set(np.array([0]), np.array([-1.0]))
    with pytest.raises(ValueError, match="total priority is 0"):
        SumTree(4).sample_stratified(2, np.random.default_rng(0))
