"""Learning correctness: the real actor core, n-step adder, replay and double-DQN learner solve a
tiny deterministic task whose best policy needs a bootstrapped multi-step plan.

The corridor: cells 0..7, start at 0, the goal (+1, the end) at 7 and a pit (−1, the end) at 4.
Action 0 walks one cell, action 1 jumps two. Only a jump from cell 3 crosses the pit: walking
from 3, or jumping from 2, falls in. No reward before the end, so the value of every early
choice has to be bootstrapped back from the goal over several steps. Observations are 84×84
uint8 images (the agent as a bright block, the pit as a dark one), stacked 4 deep as Mario's.
"""

import dataclasses

import gymnasium as gym
import numpy as np
import pytest
import torch

from actors.actor import ActorConfig, ActorCore
from common.config import EnvConfig, NetworkConfig
from learner.learner import Learner, LearnerConfig
from replay_server.replay import PrioritizedReplay, ReplayConfig

PIT, GOAL = 4, 7  # the corridor: cells 0..GOAL
GAMMA = 0.9
WALK, JUMP = 0, 1
FAR, NEAR, NEAR_REWARD = 8, 0, 0.6  # NearOrFar


class Cells(gym.Env):
    """A row of cells, the agent a bright block in one, with the info keys the actor reads from
    Mario's env; a dark block marks the pit if there is one. Subclasses move the agent."""

    goal: int
    pit: int | None = None

    def __init__(self, config: EnvConfig):
        self.stack = config.frame_stack
        self.action_space = gym.spaces.Discrete(2)
        self.cell = 0

    def _obs(self) -> np.ndarray:
        frame = np.full((84, 84), 40, dtype=np.uint8)
        if self.pit is not None:
            frame[30:54, self.pit * 10 + 2 : self.pit * 10 + 10] = 0
        frame[36:48, self.cell * 10 + 2 : self.cell * 10 + 10] = 255
        return np.repeat(frame[None], self.stack, axis=0)

    def _info(self) -> dict:
        return {"x_pos": self.cell, "flag_get": self.cell == self.goal, "world": 1, "stage": 1,
                "frames": 1}  # fmt: skip

    def reset(self, *, seed=None, options=None):
        self.cell = 0
        return self._obs(), self._info()


class Corridor(Cells):
    """Walk one cell or jump two; the pit at PIT, the goal at GOAL."""

    goal, pit = GOAL, PIT

    def step(self, action: int):
        self.cell = min(self.cell + (2 if action == JUMP else 1), GOAL)
        reward = {PIT: -1.0, GOAL: 1.0}.get(self.cell, 0.0)
        terminated = self.cell in (PIT, GOAL)
        return self._obs(), reward, terminated, False, self._info()


class NearOrFar(Cells):
    """A choice at the start, between NEAR_REWARD now and 1 at the end of a FAR-step walk.

    At cell 0, action 0 takes NEAR_REWARD and ends the episode; action 1 sets off along the
    row, where either action moves one cell on, and reaching cell FAR pays 1 and ends it.
    So Q*(0, near) = 0.6 and Q*(0, far) = γ^(FAR−1) = 0.9^7 = 0.478, and the far value reaches
    cell 0 only through three n-step bootstraps of γ³ each: a wrong n-step discount shows in
    it (γ for γ³: 0.729, a far reward worth more than the near one; an undiscounted n-step sum:
    0.53). No exploration bias: past cell 0 both actions do the same."""

    goal = FAR

    def step(self, action: int):
        if self.cell == 0 and action == NEAR:
            return self._obs(), NEAR_REWARD, True, False, self._info()
        self.cell += 1
        return self._obs(), float(self.cell == FAR), self.cell == FAR, False, self._info()


def train_on(
    env: type[Cells], seed: int, learning_rate: float, updates: int = 600, device: str = "cpu"
) -> Learner:
    """Serial training loop over the real roles (as the in-process backend runs them), on
    `env` (Corridor or NearOrFar)."""
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    env_config = dataclasses.replace(EnvConfig(), action_set="right_jump")
    network = NetworkConfig(conv_channels=(8, 16, 16), hidden=64)
    actor = ActorCore(
        env_config, ActorConfig(envs_per_actor=4, n_step=3, gamma=GAMMA, chunk_length=20),
        network, epsilons=[0.5, 0.3, 0.2, 0.1], env_factory=env,
    )  # fmt: skip
    replay_config = ReplayConfig(capacity=4000, min_size_to_sample=200, samples_per_insert=8,
                                 rate_error_buffer=64)  # fmt: skip
    replay = PrioritizedReplay(replay_config)
    learner_config = LearnerConfig(batch_size=32, learning_rate=learning_rate,
                                   target_sync_updates=50, device=device)  # fmt: skip
    learner = Learner(learner_config, network, num_actions=2)
    while learner.updates < updates:
        if replay.can_sample(32):
            sample = replay.sample(32)
            _, td_abs = learner.update(sample)
            replay.update_priorities(sample.keys, td_abs)
            if learner.updates % 10 == 0:
                actor.set_weights(learner.cpu_weights(), learner.updates)
        else:
            actor.step()
            for chunk in actor.take_chunks():
                replay.insert(chunk)
    actor.close()
    return learner


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


# On CUDA the learner's defaults apply (channels-last, fused Adam, pinned copies).
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_double_dqn_learns_to_jump_the_pit_at_the_right_cell(device):
    # Checked by hand: seeds 0–3 pass in 15–22 s here; with learning rate 1e-9 it fails.
    learner = train_on(Corridor, seed=0, learning_rate=1e-3, device=device)
    learner.online.to("cpu").float()  # the checks below read the net on the CPU
    env, q_values = Corridor(EnvConfig(action_set="right_jump")), {}
    for cell in range(GOAL):
        env.cell = cell
        with torch.inference_mode():
            q_values[cell] = learner.online(torch.from_numpy(env._obs())[None])[0].numpy()
    assert q_values[3][JUMP] > q_values[3][WALK]  # walking from 3 falls in the pit
    assert q_values[2][WALK] > q_values[2][JUMP]  # jumping from 2 falls in the pit
    # Every return lies in [−1, 1]. A bootstrap past the end (no terminal mask) inflates the
    # values far beyond 1 (checked by hand: 1.2–2.7 at every cell).
    values = np.stack(list(q_values.values()))
    assert values.min() > -1.25 and values.max() < 1.25, values
    obs, _ = env.reset()
    path = [0]
    for _ in range(10):  # the greedy policy crosses the pit to the goal
        with torch.inference_mode():
            action = int(learner.online(torch.from_numpy(obs)[None]).argmax())
        obs, _, terminated, _, _ = env.step(action)
        path.append(env.cell)
        if terminated:
            break
    assert path[-1] == GOAL and PIT not in path, path


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_n_step_bootstraps_discount_a_far_reward_by_gamma_per_step(device):
    # Q at cell 0 only: there the stack the learner trained on (the replay stacks each env's
    # last 4 frames) is 4 copies of the first frame, as here; elsewhere it holds earlier cells.
    # Checked by hand (600 updates, 15–20 s): seeds 0–3 give Q(0, far) 0.477–0.489; with the
    # n-step discount γ instead of γ^m, 0.727–0.728; with the n-step sum undiscounted,
    # 0.533–0.538; without the terminal mask, Q(0, near) 4.2.
    learner = train_on(NearOrFar, seed=0, learning_rate=1e-3, device=device)
    learner.online.to("cpu").float()
    env = NearOrFar(EnvConfig(action_set="right_jump"))
    with torch.inference_mode():
        near, far = learner.online(torch.from_numpy(env.reset()[0])[None])[0].tolist()
    assert near == pytest.approx(NEAR_REWARD, abs=0.03), (near, far)
    assert far == pytest.approx(GAMMA ** (FAR - 1), abs=0.03), (near, far)
    assert near > far  # 0.6 now beats 0.478 later; a wrong discount says otherwise
