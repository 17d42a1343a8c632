"""n-step transitions from a stream of steps, and their packing into self-contained chunks."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

from common.experience import FRAME_SHAPE, Chunk


@dataclasses.dataclass(frozen=True)
class Transition:
    """(s_t, a_t, R_t, γ_t, s_{t+m}) with states given as frame ids (per-env frame counters)."""

    obs_ids: tuple[int, ...]
    action: int
    n_step_return: float
    discount: float
    """γ^m for the m ≤ n steps to the bootstrap state; 0 after a termination."""
    next_ids: tuple[int, ...]
    q_taken: float
    """Q(s_t, a_t) by the acting network, for the initial priority."""


class NStepAdder:
    """Turns one env's steps into n-step transitions.

    Bootstrapping: a termination (death, flag) ends the return with discount 0; a truncation
    (step cap) is not an ending of the MDP, so the pending transitions bootstrap from the last
    state with discount γ^m, m being the steps they cover.
    """

    def __init__(self, n: int, gamma: float):
        if n < 1:
            raise ValueError(f"n ({n}) must be >= 1")
        if not 0 <= gamma <= 1:
            raise ValueError(f"gamma ({gamma}) must be in [0, 1]")
        self.n = n
        self.gamma = gamma
        self._window: collections.deque[tuple[tuple[int, ...], int, float, float]] = (
            collections.deque()
        )
        self._state: tuple[int, ...] | None = None

    def start(self, obs_ids: tuple[int, ...]) -> None:
        """Begins an episode at the state with these frame ids."""
        self._window.clear()
        self._state = obs_ids

    def step(
        self,
        action: int,
        reward: float,
        q_taken: float,
        next_ids: tuple[int, ...],
        terminated: bool,
        truncated: bool,
    ) -> list[Transition]:
        """Records a_t, r_t and s_{t+1}; returns the transitions that became complete."""
        if self._state is None:
            raise RuntimeError("step() before start()")
        self._window.append((self._state, action, reward, q_taken))
        self._state = next_ids
        if terminated or truncated:
            emitted = []
            while self._window:
                emitted.append(self._emit(next_ids, bootstrap=not terminated))
            self._state = None
            return emitted
        if len(self._window) == self.n:
            return [self._emit(next_ids, bootstrap=True)]
        return []

    def _emit(self, next_ids: tuple[int, ...], bootstrap: bool) -> Transition:
        n_step_return = 0.0
        for k, (_, _, reward, _) in enumerate(self._window):
            n_step_return += self.gamma**k * reward
        steps = len(self._window)
        obs_ids, action, _, q_taken = self._window.popleft()
        discount = self.gamma**steps if bootstrap else 0.0
        return Transition(obs_ids, action, n_step_return, discount, next_ids, q_taken)


class ChunkBuilder:
    """Collects one env slot's frames and prioritized transitions into self-contained Chunks."""

    def __init__(
        self, stack: int, chunk_length: int, n: int, actor_id: int, env_slot: int,
        frames_per_reset: int = 1,
    ):  # fmt: skip
        """`frames_per_reset`: the distinct frames a reset's stack can hold (1; up to `stack`
        after random no-ops)."""
        self.stack = stack
        self.chunk_length = chunk_length
        self.actor_id = actor_id
        self.env_slot = env_slot
        # Frames a pending transition can still need: the chunk's own steps (up to
        # 1 + frames_per_reset frames per transition when episodes are one step long: each
        # reset adds its frames), the stack's history and the n-step lookahead.
        self._ring_size = (1 + frames_per_reset) * chunk_length + stack + n + 8
        self._frames = np.zeros((self._ring_size, *FRAME_SHAPE), dtype=np.uint8)
        self._newest_id = -1
        self._transitions: list[Transition] = []
        self._priorities: list[float] = []

    def add_frame(self, frame_id: int, frame: np.ndarray) -> None:
        """Stores a new frame; ids must increase by one."""
        if frame_id != self._newest_id + 1:
            raise ValueError(f"frame id {frame_id} does not follow {self._newest_id}")
        self._frames[frame_id % self._ring_size] = frame
        self._newest_id = frame_id

    def add(self, transition: Transition, priority: float) -> None:
        self._transitions.append(transition)
        self._priorities.append(priority)

    def ready(self) -> bool:
        return len(self._transitions) >= self.chunk_length

    def flush(self, policy_version: int) -> Chunk | None:
        """Packs the pending transitions (None if there are none)."""
        if not self._transitions:
            return None
        obs_ids = np.array([t.obs_ids for t in self._transitions], dtype=np.int64)
        next_ids = np.array([t.next_ids for t in self._transitions], dtype=np.int64)
        needed, inverse = np.unique(np.concatenate([obs_ids, next_ids]), return_inverse=True)
        if needed[0] <= self._newest_id - self._ring_size:
            raise RuntimeError(
                f"frame {needed[0]} was overwritten (newest {self._newest_id}); chunk too long"
            )
        inverse = inverse.reshape(-1, self.stack).astype(np.uint16)
        count = len(self._transitions)
        chunk = Chunk(
            frames=self._frames[needed % self._ring_size],
            obs_index=inverse[:count],
            next_index=inverse[count:],
            actions=np.array([t.action for t in self._transitions], dtype=np.uint8),
            returns=np.array([t.n_step_return for t in self._transitions], dtype=np.float32),
            discounts=np.array([t.discount for t in self._transitions], dtype=np.float32),
            priorities=np.array(self._priorities, dtype=np.float32),
            actor_id=self.actor_id,
            env_slot=self.env_slot,
            policy_version=policy_version,
        )
        self._transitions.clear()
        self._priorities.clear()
        return chunk
