"""The unit of experience that actors produce and replay shards insert: a self-contained chunk.

A chunk holds consecutive n-step transitions of one env slot plus every frame they refer to,
each frame once. States are given as indices into the chunk's frames, so a shard needs nothing
from any other chunk (Reverb-style), at the cost of repeating the stack−1+n frames of overlap
with the previous chunk (~6 % at 100 transitions per chunk).
"""

from __future__ import annotations

import dataclasses

import numpy as np

FRAME_SHAPE = (84, 84)


class ChunkError(ValueError):
    """A chunk whose fields are inconsistent; the message names the bad field and value."""


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Transitions (s_t, a_t, R_t, γ_t, s_{t+n}) of one env slot, with their frames."""

    frames: np.ndarray
    """[M, 84, 84] uint8, each distinct frame once."""
    obs_index: np.ndarray
    """[T, stack] uint16: frames of s_t, oldest first, as indices into `frames`."""
    next_index: np.ndarray
    """[T, stack] uint16: frames of s_{t+n}."""
    actions: np.ndarray
    """[T] uint8."""
    returns: np.ndarray
    """[T] float32: discounted n-step reward sums."""
    discounts: np.ndarray
    """[T] float32: γ^m for the m steps to the bootstrap state, or 0 after a termination."""
    priorities: np.ndarray
    """[T] float32: initial priorities (|TD| by the actor's own network)."""
    actor_id: int = 0
    env_slot: int = 0
    policy_version: int = 0

    def __len__(self) -> int:
        return len(self.actions)

    def validate(self, num_actions: int | None = None) -> None:
        """Raises ChunkError naming the first inconsistent field."""
        frames = self.frames
        if frames.dtype != np.uint8 or frames.ndim != 3 or frames.shape[1:] != FRAME_SHAPE:
            raise ChunkError(f"frames must be uint8 [M, 84, 84], got {frames.dtype} {frames.shape}")
        count = len(self.actions)
        if count == 0:
            raise ChunkError("chunk has no transitions")
        for name in ("obs_index", "next_index"):
            index = getattr(self, name)
            if index.ndim != 2 or index.shape[0] != count or index.shape[1] < 1:
                raise ChunkError(f"{name} must be [{count}, stack], got {index.shape}")
            if index.size and int(index.max()) >= len(frames):
                raise ChunkError(f"{name} refers to frame {int(index.max())} of {len(frames)}")
        if self.obs_index.shape != self.next_index.shape:
            raise ChunkError(
                f"obs_index {self.obs_index.shape} and next_index {self.next_index.shape} differ"
            )
        for name in ("returns", "discounts", "priorities"):
            values = getattr(self, name)
            if values.shape != (count,):
                raise ChunkError(f"{name} must have shape ({count},), got {values.shape}")
            if not np.all(np.isfinite(values)):
                raise ChunkError(f"{name} holds a non-finite value")
        if self.actions.shape != (count,):
            raise ChunkError(f"actions must have shape ({count},), got {self.actions.shape}")
        if num_actions is not None and count and int(self.actions.max()) >= num_actions:
            raise ChunkError(f"action {int(self.actions.max())} is not below {num_actions}")
        if np.any(self.discounts < 0) or np.any(self.discounts > 1):
            raise ChunkError("discounts must lie in [0, 1]")
        if np.any(self.priorities < 0):
            raise ChunkError("priorities must be >= 0")


def synthetic_chunk(rng: np.random.Generator, length: int, stack: int = 4, n: int = 3) -> Chunk:
    """A chunk of random frames shaped like an actor's (length+stack−1+n frames, overlapping
    stacks), for the replay bench and the tests."""
    frames = rng.integers(0, 256, (length + stack - 1 + n, 84, 84), dtype=np.uint8)
    steps = np.arange(length)[:, None]
    obs_index = (steps + np.arange(stack)).astype(np.uint16)
    return Chunk(
        frames=frames,
        obs_index=obs_index,
        next_index=(obs_index + n).astype(np.uint16),
        actions=rng.integers(0, 5, length).astype(np.uint8),
        returns=rng.normal(size=length).astype(np.float32),
        discounts=np.full(length, 0.97, np.float32),
        priorities=rng.random(length).astype(np.float32),
    )
