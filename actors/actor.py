"""The actor role: K Mario envs stepped together, one batched CPU forward pass per step."""

from __future__ import annotations

import collections
import dataclasses
import math
import os
from collections.abc import Callable, Sequence

import gymnasium as gym
import numpy as np
import torch

from actors.adder import ChunkBuilder, NStepAdder, Transition
from common.config import EnvConfig, NetworkConfig
from common.experience import Chunk
from common.networks import build_network

FAILURE_AT_STEP_ENV = "MARIO_ACTOR_FAILURE_AT_STEP"
"""Fault injection for tests: when set to N, an actor's step that passes its N-th env step
raises RuntimeError (its own count: each actor of a run fails there)."""


@dataclasses.dataclass(frozen=True)
class ActorConfig:
    """Actors: vectorized envs, exploration, n-step returns, chunking."""

    envs_per_actor: int = 8
    """Envs stepped together by one actor (one batched forward pass for all)."""
    n_step: int = 3
    """n of the n-step return."""
    gamma: float = 0.9
    """Discount factor γ (the tutorial's 0.9: Mario's Δx reward is dense)."""
    epsilon: float | None = None
    """Fixed ε for every env; None uses Ape-X's ε_i = base^(1 + alpha·i/(N−1)) over env slots."""
    epsilon_base: float = 0.4
    """Ape-X ε base."""
    epsilon_alpha: float = 7.0
    """Ape-X ε exponent spread."""
    epsilon_decay_steps: int = 0
    """With > 0, every env starts at --actor.epsilon-start and decays exponentially toward its
    own ε (the ladder's, or --actor.epsilon), with this time constant in run-wide env steps:
    ε(t) = ε_env + (start − ε_env)·exp(−t / decay). For small runs, where Ape-X's ladder leaves
    most envs nearly greedy from a random network. 0: the ladder from the start."""
    epsilon_start: float = 1.0
    """Where a decaying ε starts."""
    explore_repeat_max: int = 1
    """Temporally-extended ε-greedy: a random action, once drawn, is repeated for 1..this many
    steps (uniform) before the policy acts again; 1: plain ε-greedy. Single random steps rarely
    show what several steps of another action lead to (walking up to a pit to time the jump,
    rather than hopping into it): Dabney et al. 2021, "Temporally-extended ε-greedy"."""
    chunk_length: int = 100
    """Transitions per chunk sent to the replay."""

    def __post_init__(self) -> None:
        if self.envs_per_actor < 1:
            raise ValueError(f"envs_per_actor ({self.envs_per_actor}) must be >= 1")
        if self.n_step < 1:
            raise ValueError(f"n_step ({self.n_step}) must be >= 1")
        if not 0 <= self.gamma <= 1:
            raise ValueError(f"gamma ({self.gamma}) must be in [0, 1]")
        if self.epsilon is not None and not 0 <= self.epsilon <= 1:
            raise ValueError(f"epsilon ({self.epsilon}) must be in [0, 1]")
        if not 0 < self.epsilon_base <= 1:
            raise ValueError(f"epsilon_base ({self.epsilon_base}) must be in (0, 1]")
        if self.epsilon_alpha < 0:
            raise ValueError(f"epsilon_alpha ({self.epsilon_alpha}) must be >= 0")
        if self.epsilon_decay_steps < 0:
            raise ValueError(f"epsilon_decay_steps ({self.epsilon_decay_steps}) must be >= 0")
        if not 0 <= self.epsilon_start <= 1:
            raise ValueError(f"epsilon_start ({self.epsilon_start}) must be in [0, 1]")
        if self.explore_repeat_max < 1:
            raise ValueError(f"explore_repeat_max ({self.explore_repeat_max}) must be >= 1")
        if not 0 < self.chunk_length <= 1000:
            raise ValueError(f"chunk_length ({self.chunk_length}) must be in 1..1000")


def apex_epsilon(index: int, count: int, base: float = 0.4, alpha: float = 7.0) -> float:
    """Ape-X's ε_i = base^(1 + alpha·i/(count−1)); a single actor gets `base`."""
    if count <= 1:
        return base
    return base ** (1 + alpha * index / (count - 1))


def slot_epsilons(config: ActorConfig, band: int, bands: int) -> list[float]:
    """The ε of each env of one actor.

    Ape-X's ladder is spread over the env slots of `bands` actors (bands × envs_per_actor
    values); this actor's envs take the values of band `band`. An actor started later in a run
    (elastic) takes an initial actor's band, so the mix of exploration stays what it was.
    With `config.epsilon` set, every env uses it.

    Raises:
        ValueError: if band is not in 0..bands−1.
    """
    k = config.envs_per_actor
    if config.epsilon is not None:
        return [config.epsilon] * k
    if not 0 <= band < bands:
        raise ValueError(f"epsilon band {band} is outside 0..{bands - 1} (bands)")
    return [
        apex_epsilon(band * k + slot, bands * k, config.epsilon_base, config.epsilon_alpha)
        for slot in range(k)
    ]


@dataclasses.dataclass(frozen=True)
class EpisodeResult:
    """One finished episode, for telemetry."""

    env_slot: int
    episode_return: float
    length: int
    max_x_pos: int
    flag_get: bool
    level: str
    epsilon: float
    truncated: bool


class _EnvSlot:
    """Per-env state: the adder, the chunk builder, frame ids and episode counters."""

    def __init__(self, env: gym.Env, adder: NStepAdder, builder: ChunkBuilder, epsilon: float):
        self.env = env
        self.adder = adder
        self.builder = builder
        self.epsilon = epsilon
        self.obs: np.ndarray | None = None
        self.ids: collections.deque[int] = collections.deque()
        self.next_frame_id = 0
        self.episode_return = 0.0
        self.length = 0
        self.max_x_pos = 0
        self.repeat_action, self.repeat_left = 0, 0  # a random action still being repeated
        # Transitions waiting for max_a Q(s_{t+m}) before their priority is known.
        self.awaiting: list[Transition] = []


class ActorCore:
    """Plays K envs with ε-greedy on a CPU copy of the Q-network; emits prioritized chunks."""

    def __init__(
        self,
        env_config: EnvConfig,
        actor_config: ActorConfig,
        network_config: NetworkConfig,
        *,
        epsilons: Sequence[float],
        actor_id: int = 0,
        seed: int = 0,
        env_factory: Callable[[EnvConfig], gym.Env] | None = None,
    ):
        """`epsilons`: the ε of each env (see slot_epsilons); `actor_id` tags its chunks and
        seeds its envs and its random numbers; `env_factory` makes each env (the Mario pipeline;
        a test passes a tiny env with the same observations and info keys). The Mario pipeline
        is imported here, not at module level: the core then runs where nes-py is not installed
        (a GPU machine checking the learner path on the corridor test)."""
        if env_factory is None:
            from common.mario_env import make_env as env_factory
        if len(epsilons) != actor_config.envs_per_actor:
            raise ValueError(
                f"{len(epsilons)} epsilons for {actor_config.envs_per_actor} envs_per_actor"
            )
        self.env_config = env_config
        self.config = actor_config
        self.actor_id = actor_id
        self.network = build_network(network_config, env_config.num_actions, env_config.frame_stack)
        self.network.eval()
        self.policy_version = 0
        self.rng = np.random.default_rng([seed, actor_id])
        self.env_steps = 0
        self.frames = 0
        self._failure_at_step = int(os.environ.get(FAILURE_AT_STEP_ENV) or 0)
        self._ready: list[Chunk] = []
        k = actor_config.envs_per_actor
        self.slots: list[_EnvSlot] = []
        for slot_index, epsilon in enumerate(epsilons):
            env = env_factory(env_config)
            slot = _EnvSlot(
                env,
                NStepAdder(actor_config.n_step, actor_config.gamma),
                ChunkBuilder(
                    env_config.frame_stack,
                    actor_config.chunk_length,
                    actor_config.n_step,
                    actor_id,
                    slot_index,
                    frames_per_reset=env_config.frame_stack if env_config.noop_max else 1,
                ),
                float(epsilon),
            )
            self.slots.append(slot)
            self._begin_episode(slot, *env.reset(seed=seed * 100_003 + actor_id * k + slot_index))
        self._final_epsilons = [float(epsilon) for epsilon in epsilons]
        self.set_run_env_steps(0)

    @property
    def epsilons(self) -> list[float]:
        return [slot.epsilon for slot in self.slots]

    def set_run_env_steps(self, env_steps: int) -> None:
        """Moves each env's ε along the decay schedule to the run's env-step count (a no-op
        without --actor.epsilon-decay-steps)."""
        decay = self.config.epsilon_decay_steps
        if not decay:
            return
        fraction = math.exp(-max(env_steps, 0) / decay)
        start = self.config.epsilon_start
        for slot, final in zip(self.slots, self._final_epsilons, strict=True):
            slot.epsilon = final + (start - final) * fraction

    def set_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Loads new policy weights (published by the learner as `version`)."""
        self.network.load_state_dict(state_dict)
        self.policy_version = version

    def _new_frame(self, slot: _EnvSlot, frame: np.ndarray) -> int:
        frame_id = slot.next_frame_id
        slot.builder.add_frame(frame_id, frame)
        slot.next_frame_id += 1
        return frame_id

    def _begin_episode(self, slot: _EnvSlot, obs: np.ndarray, info: dict) -> None:
        # The reset's stack as the policy sees it: copies of the first frame, then (after
        # --env.noop-max no-ops) the frames those steps showed. A repeated frame is stored once.
        ids: list[int] = []
        for index, frame in enumerate(obs):
            if index and np.array_equal(frame, obs[index - 1]):
                ids.append(ids[-1])
            else:
                ids.append(self._new_frame(slot, frame))
        slot.ids = collections.deque(ids)
        slot.obs = obs
        slot.adder.start(tuple(slot.ids))
        slot.episode_return, slot.length = 0.0, 0
        slot.max_x_pos = info["x_pos"]
        slot.repeat_left = 0
        self.frames += info["frames"]

    def _q_values(self, observations: list[np.ndarray]) -> np.ndarray:
        batch = torch.from_numpy(np.stack(observations))  # [K, stack, 84, 84] uint8
        with torch.inference_mode():
            return self.network(batch).numpy()  # [K, A]

    def step(self) -> list[EpisodeResult]:
        """One agent step in every env; returns the episodes that ended."""
        if 0 < self._failure_at_step <= self.env_steps + len(self.slots):
            raise RuntimeError(f"injected failure at env step {self._failure_at_step}")
        q = self._q_values([slot.obs for slot in self.slots])  # [K, A]
        q_max = q.max(axis=1)
        greedy = q.argmax(axis=1)
        finished: list[EpisodeResult] = []
        truncated_finals: list[tuple[_EnvSlot, list[Transition], np.ndarray]] = []
        for index, slot in enumerate(self.slots):
            # Transitions that were waiting for the value of this state get their priority.
            self._prioritize(slot, slot.awaiting, float(q_max[index]))
            slot.awaiting = []
            action = self._choose(slot, int(greedy[index]))
            obs, reward, terminated, truncated, info = slot.env.step(action)
            self.env_steps += 1
            self.frames += info["frames"]
            slot.episode_return += reward
            slot.length += 1
            slot.max_x_pos = max(slot.max_x_pos, info["x_pos"])
            slot.ids.append(self._new_frame(slot, obs[-1]))
            slot.ids.popleft()
            emitted = slot.adder.step(
                action, reward, float(q[index, action]), tuple(slot.ids), terminated, truncated
            )
            if terminated:
                self._prioritize(slot, emitted, 0.0)
            elif truncated:
                truncated_finals.append((slot, emitted, obs.copy()))
            else:
                slot.awaiting = emitted
            if terminated or truncated:
                finished.append(
                    EpisodeResult(
                        env_slot=index,
                        episode_return=slot.episode_return,
                        length=slot.length,
                        max_x_pos=slot.max_x_pos,
                        flag_get=bool(info["flag_get"]),
                        level=f"{info['world']}-{info['stage']}",
                        epsilon=slot.epsilon,
                        truncated=truncated,
                    )
                )
                self._begin_episode(slot, *slot.env.reset())
            else:
                slot.obs = obs
        if truncated_finals:  # rare (step cap): value the final states in one extra pass
            finals_q = self._q_values([final for _, _, final in truncated_finals]).max(axis=1)
            for (slot, emitted, _), value in zip(truncated_finals, finals_q, strict=True):
                self._prioritize(slot, emitted, float(value))
        return finished

    def _choose(self, slot: _EnvSlot, greedy: int) -> int:
        """ε-greedy, with a random action repeated for a random 1..explore_repeat_max steps."""
        if slot.repeat_left > 0:
            slot.repeat_left -= 1
            return slot.repeat_action
        if self.rng.random() >= slot.epsilon:
            return greedy
        action = int(self.rng.integers(self.env_config.num_actions))
        if self.config.explore_repeat_max > 1:  # (no draw otherwise: plain ε-greedy's stream)
            slot.repeat_action = action
            slot.repeat_left = int(self.rng.integers(self.config.explore_repeat_max))
        return action

    def _prioritize(self, slot: _EnvSlot, transitions: list[Transition], next_q_max: float) -> None:
        for transition in transitions:
            target = transition.n_step_return + transition.discount * next_q_max
            slot.builder.add(transition, abs(target - transition.q_taken))
        if slot.builder.ready():
            self._ready.append(slot.builder.flush(self.policy_version))

    def take_chunks(self, flush: bool = False) -> list[Chunk]:
        """Chunks ready for the replay; flush=True also packs partial ones (e.g. at shutdown)."""
        if flush:
            for slot in self.slots:
                chunk = slot.builder.flush(self.policy_version)
                if chunk is not None:
                    self._ready.append(chunk)
        chunks, self._ready = self._ready, []
        return chunks

    def close(self) -> None:
        for slot in self.slots:
            slot.env.close()
