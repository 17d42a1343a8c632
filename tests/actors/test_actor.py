"""The actor core on the real emulator: ε per env, valid chunks, locally computed priorities."""

import numpy as np
import pytest
import torch

from actors.actor import ActorConfig, ActorCore, apex_epsilon, slot_epsilons
from common.config import EnvConfig, NetworkConfig


@pytest.mark.parametrize(
    ("index", "count", "expected"),
    [
        (0, 1, 0.4),
        (0, 8, 0.4),  # 0.4^1
        (7, 8, 0.4**8),  # 0.4^(1+7) = 0.00065536
        (1, 3, 0.016190),  # 0.4^(1 + 3.5) = 0.4^4.5
    ],
)
def test_apex_epsilon(index, count, expected):
    assert apex_epsilon(index, count) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize(
    ("band", "bands", "expected"),
    [
        # 2 envs per actor, 2 bands: the ladder has 4 slots, 0.4^(1 + 7·i/3)
        (0, 2, [0.4, 0.4 ** (1 + 7 / 3)]),  # 0.4, 0.0466
        (1, 2, [0.4 ** (1 + 14 / 3), 0.4**8]),  # 0.00543, 0.000655
        (0, 1, [0.4, 0.4**8]),
    ],
)
def test_slot_epsilons_spread_apex_ladder_over_bands(band, bands, expected):
    assert slot_epsilons(ActorConfig(envs_per_actor=2), band, bands) == pytest.approx(expected)


def test_a_fixed_epsilon_and_a_bad_band():
    assert slot_epsilons(ActorConfig(envs_per_actor=3, epsilon=0.05), 0, 1) == [0.05] * 3
    with pytest.raises(ValueError, match=r"epsilon band 2 is outside 0\.\.1"):
        slot_epsilons(ActorConfig(envs_per_actor=2), band=2, bands=2)


@pytest.mark.parametrize(
    ("env_steps", "expected"),
    [
        # ε(t) = ε_env + (1 − ε_env)·exp(−t / 100,000), ε_env = 0.1 and 0.01
        (0, [1.0, 1.0]),
        (100_000, [0.1 + 0.9 * 0.367879, 0.01 + 0.99 * 0.367879]),  # 0.43109, 0.37420
        (300_000, [0.1 + 0.9 * 0.049787, 0.01 + 0.99 * 0.049787]),  # 0.14481, 0.05929
        (10**8, [0.1, 0.01]),
    ],
)
def test_epsilon_decays_from_start_toward_each_envs_own(env_steps, expected):
    config = ActorConfig(envs_per_actor=2, epsilon_decay_steps=100_000, epsilon_start=1.0)
    actor = ActorCore(EnvConfig(), config, NetworkConfig(), epsilons=[0.1, 0.01])
    actor.set_run_env_steps(env_steps)
    assert actor.epsilons == pytest.approx(expected, rel=1e-5)
    actor.close()


@pytest.mark.parametrize(
    ("repeat_max", "epsilon", "draws", "expected"),
    [
        # (random draw, uniform draw, integers draws) → actions; greedy is action 4
        (1, 1.0, [(0.0, 2), (0.0, 3), (0.0, 1)], [2, 3, 1]),  # plain ε-greedy: one step each
        (1, 0.0, [(0.5,), (0.5,)], [4, 4]),  # greedy
        # repeat_max 3: a random action, then 0..2 more steps of it
        (3, 1.0, [(0.0, 2, 2), (0.0, 1, 0), (0.0, 0, 1)], [2, 2, 2, 1, 0, 0]),
        (3, 0.5, [(0.7,), (0.2, 3, 1), (0.9,)], [4, 3, 3, 4]),
    ],
)
def test_temporally_extended_exploration_repeats_a_random_action(repeat_max, epsilon, draws,
                                                                 expected):  # fmt: skip
    class Script:
        """Stands in for the actor's Generator: hands out the draws of the table in order."""

        def __init__(self, draws):
            self.values = [value for draw in draws for value in draw]

        def random(self):
            return self.values.pop(0)

        def integers(self, high):
            value = self.values.pop(0)
            assert 0 <= value < high
            return value

    config = ActorConfig(envs_per_actor=1, explore_repeat_max=repeat_max)
    actor = ActorCore(EnvConfig(action_set="right_only"), config, NetworkConfig(),
                      epsilons=[epsilon])  # fmt: skip
    actor.rng = Script(draws)
    slot = actor.slots[0]
    assert [actor._choose(slot, greedy=4) for _ in expected] == expected
    assert actor.rng.values == []  # every draw used, none more
    with pytest.raises(ValueError, match="explore_repeat_max"):
        ActorConfig(explore_repeat_max=0)
    actor.close()


@pytest.mark.parametrize("noop_max", [0, 12])
def test_actor_emits_valid_chunks_with_its_own_priorities(noop_max):
    # With no-op starts a reset's stack holds several distinct frames: the chunks must hold
    # each stack the actor acted on, frame for frame.
    env_config = EnvConfig(max_episode_steps=25, noop_max=noop_max)  # truncations happen too
    actor_config = ActorConfig(envs_per_actor=2, chunk_length=20)
    epsilons = slot_epsilons(actor_config, band=1, bands=2)
    actor = ActorCore(env_config, actor_config, NetworkConfig(), epsilons=epsilons, actor_id=1)
    assert actor.epsilons == pytest.approx([apex_epsilon(2, 4), apex_epsilon(3, 4)])
    episodes, chunks, acted_on = [], [], {0: [], 1: []}
    for _ in range(150):
        for index, slot in enumerate(actor.slots):
            acted_on[index].append(slot.obs.copy())
        episodes += actor.step()
        chunks += actor.take_chunks()
    chunks += actor.take_chunks(flush=True)
    assert actor.env_steps == 300
    for index in (0, 1):  # a slot's transitions are its steps, in order
        stored = [c.frames[c.obs_index] for c in chunks if c.env_slot == index]
        stored = np.concatenate(stored)
        np.testing.assert_array_equal(stored, np.stack(acted_on[index][: len(stored)]))
    assert any(e.truncated for e in episodes)
    assert {c.env_slot for c in chunks} == {0, 1}
    total = 0
    for chunk in chunks:
        chunk.validate(num_actions=5)
        total += len(chunk)
        # Priorities were computed by the acting network: recompute them.
        with torch.inference_mode():
            q = actor.network(torch.from_numpy(chunk.frames[chunk.obs_index])).numpy()
            q_next = actor.network(torch.from_numpy(chunk.frames[chunk.next_index])).numpy()
        q_taken = q[np.arange(len(chunk)), chunk.actions]
        target = chunk.returns + chunk.discounts * q_next.max(axis=1)
        np.testing.assert_allclose(chunk.priorities, np.abs(target - q_taken), atol=1e-4)
    # every step became a transition, except the few awaiting a value at the end
    assert 300 - 2 * 3 <= total <= 300
    actor.close()
