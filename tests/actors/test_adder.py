"""n-step adder tables (γ = 0.5, n = 3) and chunk packing."""

import numpy as np
import pytest

from actors.adder import ChunkBuilder, NStepAdder


def run_adder(rewards, end=None, n=3, gamma=0.5):
    """Feeds steps 0..len-1 (state s_k has ids (k,)); `end` marks the last step's ending."""
    adder = NStepAdder(n, gamma)
    adder.start((0,))
    out = []
    for step, reward in enumerate(rewards):
        last = step == len(rewards) - 1
        terminated = last and end == "terminated"
        truncated = last and end == "truncated"
        for t in adder.step(step % 5, reward, 0.0, (step + 1,), terminated, truncated):
            out.append((t.obs_ids[0], t.n_step_return, t.discount, t.next_ids[0]))
    return out


@pytest.mark.parametrize(
    ("rewards", "end", "expected"),
    [
        # No ending: one transition per step once the window holds n = 3 steps.
        # R0 = 1 + .5·2 + .25·3 = 2.75; R1 = 2 + .5·3 + .25·4 = 4.5; bootstrap γ³ = .125
        ([1, 2, 3, 4], None, [(0, 2.75, 0.125, 3), (1, 4.5, 0.125, 4)]),
        # A death at step 3 (window crossing it): the last three transitions end at the
        # death with discount 0, shorter windows included (R2 = 3 + .5·4, R3 = 4).
        (
            [1, 2, 3, 4],
            "terminated",
            [(0, 2.75, 0.125, 3), (1, 4.5, 0.0, 4), (2, 5.0, 0.0, 4), (3, 4.0, 0.0, 4)],
        ),
        # A flag after two steps (flag reward 15): both transitions terminal, no bootstrap.
        ([1, 15], "terminated", [(0, 8.5, 0.0, 2), (1, 15.0, 0.0, 2)]),
        # The death penalty on the first step: a one-step episode.
        ([-15], "terminated", [(0, -15.0, 0.0, 1)]),
        # A truncation (step cap) is no termination: bootstrap from the last state with γ^m,
        # m = the steps each transition covers (2 → .25, 1 → .5).
        ([1, 2], "truncated", [(0, 2.0, 0.25, 2), (1, 2.0, 0.5, 2)]),
        # A truncation with a full window: m = 3, 2, 1.
        (
            [1, 2, 3, 4],
            "truncated",
            [(0, 2.75, 0.125, 3), (1, 4.5, 0.125, 4), (2, 5.0, 0.25, 4), (3, 4.0, 0.5, 4)],
        ),
    ],
)
def test_n_step_table(rewards, end, expected):
    got = run_adder(rewards, end)
    assert [(o, pytest.approx(r), pytest.approx(d), x) for o, r, d, x in got] == expected


def test_next_episode_starts_clean():
    adder = NStepAdder(3, 0.5)
    adder.start((0,))
    adder.step(0, 1.0, 0.0, (1,), False, False)
    assert len(adder.step(0, 1.0, 0.0, (2,), True, False)) == 2
    adder.start((10,))
    assert adder.step(0, 7.0, 0.0, (11,), False, False) == []
    emitted = adder.step(0, 0.0, 0.0, (12,), True, False)
    assert [t.obs_ids for t in emitted] == [(10,), (11,)]
    assert emitted[0].n_step_return == pytest.approx(7.0)  # no reward from the old episode


def test_n_equals_one_is_plain_td():
    assert run_adder([3, 4], None, n=1, gamma=0.9) == [(0, 3.0, 0.9, 1), (1, 4.0, 0.9, 2)]


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"n \(0\)"):
        NStepAdder(0, 0.9)
    with pytest.raises(ValueError, match=r"gamma \(1.5\)"):
        NStepAdder(3, 1.5)


def test_chunk_builder_stores_each_frame_once():
    builder = ChunkBuilder(stack=4, chunk_length=3, n=1, actor_id=2, env_slot=1)
    adder = NStepAdder(1, 0.9)
    for frame_id in range(5):
        builder.add_frame(frame_id, np.full((84, 84), frame_id * 10, np.uint8))
    adder.start((0, 0, 0, 0))
    states = [(0, 0, 0, 1), (0, 0, 1, 2), (0, 1, 2, 3)]
    for step, ids in enumerate(states):
        for transition in adder.step(step, 1.0, 0.5, ids, False, False):
            builder.add(transition, 0.5)
    assert builder.ready()
    chunk = builder.flush(policy_version=7)
    chunk.validate(num_actions=5)
    assert len(chunk.frames) == 4  # frames 0..3, each once
    np.testing.assert_array_equal(
        chunk.frames[chunk.obs_index][:, :, 0, 0], [[0, 0, 0, 0], [0, 0, 0, 10], [0, 0, 10, 20]]
    )
    np.testing.assert_array_equal(
        chunk.frames[chunk.next_index][:, :, 0, 0], [[0, 0, 0, 10], [0, 0, 10, 20], [0, 10, 20, 30]]
    )
    assert (chunk.actor_id, chunk.env_slot, chunk.policy_version) == (2, 1, 7)
    assert builder.flush(0) is None
    with pytest.raises(ValueError, match="does not follow"):
        builder.add_frame(9, np.zeros((84, 84), np.uint8))
