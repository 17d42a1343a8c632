"""Proportional prioritized replay with frame-deduplicated storage (plain NumPy, no Ray).

Storage is two FIFO rings: frames ([F, 84, 84] uint8, each frame once) and transitions (frame
ids of s_t and s_{t+n}, action, n-step return, discount). A frame id is a global insertion
counter; frame `i` lives in slot `i % F` and is valid while `i >= frames_inserted − F`. Because
a chunk's transitions refer only to that chunk's frames, the oldest frame a transition needs
grows with insertion order, so eviction sweeps the transition ring from its oldest entry and
stops at the first still-valid one.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import zipfile

import numpy as np

from common.experience import FRAME_SHAPE, Chunk, ChunkError
from replay_server.rate_limiter import RateLimiter
from replay_server.sum_tree import SumTree


class ReplayError(Exception):
    """Base class of the replay's errors."""


class ReplayNotReady(ReplayError):
    """sample() was called while the rate limiter does not allow it."""


class SnapshotError(ReplayError):
    """A snapshot file is missing, malformed or was made with another configuration."""


@dataclasses.dataclass(frozen=True)
class ReplayConfig:
    """Prioritized replay."""

    capacity: int = 100_000
    """Transitions held; the oldest are evicted first."""
    frames_per_transition: float = 1.08
    """Frame slots per transition slot (chunks repeat stack−1+n frames of overlap)."""
    alpha: float = 0.6
    """Priority exponent α: P(i) ∝ p_i^α."""
    beta_start: float = 0.4
    """Importance-sampling exponent β at the start, annealed linearly to beta_end."""
    beta_end: float = 1.0
    """Importance-sampling exponent β at the end of the annealing."""
    beta_anneal_samples: int = 10_000_000
    """Sampled transitions over which β goes from beta_start to beta_end (the run's, over all
    shards)."""
    min_size_to_sample: int = 5_000
    """Transitions needed before the first sample."""
    samples_per_insert: float = 8.0
    """Target ratio of sampled to inserted transitions (rate limiter)."""
    rate_error_buffer: float = 4096.0
    """Allowed deviation (in transitions) from samples_per_insert before one side is held."""
    priority_epsilon: float = 1e-6
    """Added to |TD| so that no transition gets probability 0."""

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"capacity ({self.capacity}) must be >= 1")
        if self.frames_per_transition < 1:
            raise ValueError(f"frames_per_transition ({self.frames_per_transition}) must be >= 1")
        if self.alpha < 0:
            raise ValueError(f"alpha ({self.alpha}) must be >= 0")
        for name in ("beta_start", "beta_end"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} ({getattr(self, name)}) must be in [0, 1]")
        if self.beta_anneal_samples < 1:
            raise ValueError(f"beta_anneal_samples ({self.beta_anneal_samples}) must be >= 1")
        if not 1 <= self.min_size_to_sample <= self.capacity:
            raise ValueError(
                f"min_size_to_sample ({self.min_size_to_sample}) must be in [1, capacity]"
            )
        if self.samples_per_insert <= 0:
            raise ValueError(f"samples_per_insert ({self.samples_per_insert}) must be > 0")
        if self.priority_epsilon <= 0:
            raise ValueError(f"priority_epsilon ({self.priority_epsilon}) must be > 0")

    @property
    def frame_slots(self) -> int:
        """Frame slots the replay allocates: frames_per_transition per transition slot, plus 64
        (room for the overlap frames of a last chunk even in tiny test replays)."""
        return math.ceil(self.capacity * self.frames_per_transition) + 64


@dataclasses.dataclass(frozen=True)
class Sample:
    """A sampled batch. States are uint8; scale them on the learner's device."""

    keys: np.ndarray
    """[B] int64 transition keys, for update_priorities."""
    probabilities: np.ndarray
    """[B] sampling probabilities P(i)."""
    weights: np.ndarray
    """[B] float32 importance weights (N·P(i))^−β, divided by the batch maximum."""
    table_size: int
    obs: np.ndarray
    """[B, stack, 84, 84] uint8."""
    actions: np.ndarray
    """[B] int64."""
    returns: np.ndarray
    """[B] float32 n-step returns."""
    discounts: np.ndarray
    """[B] float32 bootstrap discounts."""
    next_obs: np.ndarray
    """[B, stack, 84, 84] uint8."""


class PrioritizedReplay:
    """insert(chunk) / sample(batch) / update_priorities(keys, |td|), with snapshots.

    Keys are global insertion counters: key k lives in slot k % capacity, so an update for a
    key whose slot was reused since (evicted meanwhile) is recognised and ignored.
    """

    def __init__(self, config: ReplayConfig, *, stack: int = 4, seed: int = 0):
        self.config = config
        self.stack = stack
        capacity = config.capacity
        self.frame_capacity = config.frame_slots
        self.frames = np.zeros((self.frame_capacity, *FRAME_SHAPE), dtype=np.uint8)
        self.obs_ids = np.zeros((capacity, stack), dtype=np.int64)
        self.next_ids = np.zeros((capacity, stack), dtype=np.int64)
        self.min_frame_id = np.zeros(capacity, dtype=np.int64)
        self.actions = np.zeros(capacity, dtype=np.uint8)
        self.returns = np.zeros(capacity, dtype=np.float32)
        self.discounts = np.zeros(capacity, dtype=np.float32)
        self.keys = np.full(capacity, -1, dtype=np.int64)  # -1: empty or evicted
        self.tree = SumTree(capacity)
        self.limiter = RateLimiter(
            config.samples_per_insert, config.min_size_to_sample, config.rate_error_buffer
        )
        self.rng = np.random.default_rng(seed)
        self.frames_inserted = 0
        self.transitions_inserted = 0
        self.oldest_key = 0  # eviction sweep position
        self.size = 0  # valid transitions
        self.evicted_by_frames = 0
        self.priority_updates = 0  # keys given new priorities, since this replay was made

    # -- inserting ----------------------------------------------------------------------------

    def insert(self, chunk: Chunk) -> np.ndarray:
        """Stores a chunk's frames and transitions; returns their keys.

        Raises:
            ChunkError: if the chunk is inconsistent (nothing is stored then).
        """
        chunk.validate()
        if chunk.obs_index.shape[1] != self.stack:
            raise ChunkError(f"chunk stack {chunk.obs_index.shape[1]} != replay stack {self.stack}")
        count = len(chunk)
        if count > self.config.capacity or len(chunk.frames) > self.frame_capacity:
            raise ChunkError(f"chunk of {count} transitions does not fit the replay")
        # Frames first: ids base .. base+M-1.
        base = self.frames_inserted
        frame_slots = (base + np.arange(len(chunk.frames))) % self.frame_capacity
        self.frames[frame_slots] = chunk.frames
        self.frames_inserted += len(chunk.frames)
        # Transitions reuse the oldest slots (FIFO): those keys are evicted.
        keys = self.transitions_inserted + np.arange(count, dtype=np.int64)
        slots = keys % self.config.capacity
        self._evict_slots(slots)
        # Trap: the indices are uint16; widen before adding the (large) base frame id.
        obs_ids = base + chunk.obs_index.astype(np.int64)
        next_ids = base + chunk.next_index.astype(np.int64)
        self.obs_ids[slots] = obs_ids
        self.next_ids[slots] = next_ids
        self.min_frame_id[slots] = np.minimum(obs_ids.min(axis=1), next_ids.min(axis=1))
        self.actions[slots] = chunk.actions
        self.returns[slots] = chunk.returns
        self.discounts[slots] = chunk.discounts
        self.keys[slots] = keys
        self.tree.set(slots, self._to_priority(chunk.priorities))
        self.transitions_inserted += count
        self.size += count
        self.limiter.record_insert(count)
        self._evict_overwritten_frames()
        return keys

    def _evict_slots(self, slots: np.ndarray) -> None:
        live = self.keys[slots] >= 0
        if np.any(live):
            dead = slots[live]
            self.keys[dead] = -1
            self.tree.set(dead, np.zeros(len(dead)))
            self.size -= len(dead)
        self.oldest_key = max(
            self.oldest_key, self.transitions_inserted + len(slots) - self.config.capacity
        )

    def _evict_overwritten_frames(self) -> None:
        """Invalidates the oldest transitions whose frames were overwritten."""
        watermark = self.frames_inserted - self.frame_capacity  # oldest valid frame id
        capacity = self.config.capacity
        while self.oldest_key < self.transitions_inserted:
            slot = self.oldest_key % capacity
            if self.keys[slot] == self.oldest_key and self.min_frame_id[slot] >= watermark:
                break
            if self.keys[slot] == self.oldest_key:
                self.keys[slot] = -1
                self.tree.set(np.array([slot]), np.zeros(1))
                self.size -= 1
                self.evicted_by_frames += 1
            self.oldest_key += 1

    def _to_priority(self, td_abs: np.ndarray) -> np.ndarray:
        priority = (np.asarray(td_abs, dtype=np.float64) + self.config.priority_epsilon) ** (
            self.config.alpha
        )
        return priority

    # -- sampling -----------------------------------------------------------------------------

    @property
    def beta(self) -> float:
        """The annealed importance-sampling exponent."""
        config = self.config
        fraction = min(1.0, self.limiter.samples / config.beta_anneal_samples)
        return config.beta_start + fraction * (config.beta_end - config.beta_start)

    def can_sample(self, batch_size: int) -> bool:
        """Whether the rate limiter allows a batch now."""
        return self.limiter.can_sample(batch_size, self.size)

    def can_insert(self, count: int = 1) -> bool:
        """Whether the rate limiter allows `count` more transitions now."""
        return self.limiter.can_insert(count, self.size)

    def sample(self, batch_size: int, force: bool = False) -> Sample:
        """Samples a batch in proportion to priority^α (stratified over the total mass).

        Raises:
            ReplayNotReady: if the rate limiter holds sampling back (unless force=True).
        """
        if not force and not self.can_sample(batch_size):
            raise ReplayNotReady(
                f"cannot sample {batch_size}: size {self.size}, inserts "
                f"{self.limiter.inserts}, samples {self.limiter.samples}"
            )
        if self.size == 0:
            raise ReplayNotReady("the replay is empty")
        slots = self.tree.sample_stratified(batch_size, self.rng)
        total = self.tree.total
        probabilities = self.tree.get(slots) / total
        beta = self.beta
        weights = (self.size * probabilities) ** (-beta)
        weights = (weights / weights.max()).astype(np.float32)
        obs = self.frames[self.obs_ids[slots] % self.frame_capacity]
        next_obs = self.frames[self.next_ids[slots] % self.frame_capacity]
        self.limiter.record_sample(batch_size)
        return Sample(
            keys=self.keys[slots].copy(),
            probabilities=probabilities,
            weights=weights,
            table_size=self.size,
            obs=obs,
            actions=self.actions[slots].astype(np.int64),
            returns=self.returns[slots].copy(),
            discounts=self.discounts[slots].copy(),
            next_obs=next_obs,
        )

    def update_priorities(self, keys: np.ndarray, td_abs: np.ndarray) -> int:
        """Sets new priorities from |TD|; keys evicted meanwhile are ignored.

        Returns:
            How many keys were still present and updated.
        """
        keys = np.asarray(keys, dtype=np.int64)
        td_abs = np.asarray(td_abs, dtype=np.float64)
        if keys.shape != td_abs.shape:
            raise ValueError(f"keys {keys.shape} and priorities {td_abs.shape} differ in shape")
        slots = keys % self.config.capacity
        present = (keys >= 0) & (self.keys[slots] == keys)
        self.tree.set(slots[present], self._to_priority(td_abs[present]))
        updated = int(present.sum())
        self.priority_updates += updated
        return updated

    # -- accounting and snapshots ---------------------------------------------------------------

    def nbytes(self) -> int:
        """Bytes held by the replay's arrays."""
        arrays = (
            self.frames,
            self.obs_ids,
            self.next_ids,
            self.min_frame_id,
            self.actions,
            self.returns,
            self.discounts,
            self.keys,
            self.tree.nodes,
        )
        return sum(array.nbytes for array in arrays)

    def stats(self) -> dict[str, float]:
        """Counters for metrics."""
        inserts = max(self.limiter.inserts, 1)
        return {
            "replay/size": self.size,
            "replay/inserted": self.limiter.inserts,
            "replay/sampled": self.limiter.samples,
            "replay/sample_to_insert_ratio": self.limiter.samples / inserts,
            "replay/evicted_by_frames": self.evicted_by_frames,
            "replay/priority_updates": self.priority_updates,
            "replay/beta": self.beta,
            "replay/total_priority": self.tree.total,
        }

    # Stored after (capacity, frame slots, stack); index 3 + i in the snapshot's counters.
    _SNAPSHOT_COUNTERS = (
        "frames_inserted",
        "transitions_inserted",
        "oldest_key",
        "size",
        "limiter.inserts",
        "limiter.samples",
        "evicted_by_frames",
    )

    def _get_counter(self, name: str) -> int:
        owner, _, attribute = name.rpartition(".")
        return int(getattr(self.limiter if owner else self, attribute))

    def _set_counter(self, name: str, value: int) -> None:
        owner, _, attribute = name.rpartition(".")
        setattr(self.limiter if owner else self, attribute, value)

    _SNAPSHOT_ARRAYS = (
        "frames",
        "obs_ids",
        "next_ids",
        "min_frame_id",
        "actions",
        "returns",
        "discounts",
        "keys",
    )

    def snapshot(self, path: pathlib.Path) -> None:
        """Writes the whole replay to one .npz (no pickle), atomically."""
        write_snapshot(path, self.snapshot_arrays(copy=False))

    def snapshot_arrays(self, copy: bool = True) -> dict[str, np.ndarray]:
        """The replay's state as arrays for write_snapshot: copies (a memcpy, fast) when the
        replay goes on changing while they are written, so only the copy needs a lock."""
        counters = np.array(
            [self.config.capacity, self.frame_capacity, self.stack]
            + [self._get_counter(name) for name in self._SNAPSHOT_COUNTERS],
            dtype=np.int64,
        )
        leaves = self.tree.nodes[self.tree.size : self.tree.size + self.config.capacity]
        arrays = {"counters": counters, "leaves": leaves,
                  **{name: getattr(self, name) for name in self._SNAPSHOT_ARRAYS}}  # fmt: skip
        return {name: array.copy() for name, array in arrays.items()} if copy else arrays

    def restore(self, path: pathlib.Path) -> None:
        """Loads a snapshot written by a replay of the same capacity and stack.

        Raises:
            SnapshotError: naming the file and what is wrong with it.
        """
        path = pathlib.Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            raise SnapshotError(f"cannot read replay snapshot {path}: {error}") from error
        missing = {"counters", "leaves", *self._SNAPSHOT_ARRAYS} - set(arrays)
        if missing:
            raise SnapshotError(f"replay snapshot {path} lacks {sorted(missing)}")
        counters = arrays["counters"]
        if counters.shape != (3 + len(self._SNAPSHOT_COUNTERS),) or counters.dtype != np.int64:
            raise SnapshotError(f"replay snapshot {path}: counters has the wrong shape or type")
        expected = (self.config.capacity, self.frame_capacity, self.stack)
        if tuple(int(v) for v in counters[:3]) != expected:
            raise SnapshotError(
                f"replay snapshot {path} has (capacity, frame slots, stack) "
                f"{tuple(int(v) for v in counters[:3])}, this replay {expected}"
            )
        layouts = {name: (getattr(self, name).shape, getattr(self, name).dtype)
                   for name in self._SNAPSHOT_ARRAYS}  # fmt: skip
        layouts["leaves"] = ((self.config.capacity,), self.tree.nodes.dtype)
        for name, (shape, dtype) in layouts.items():  # all checked before anything is overwritten
            if arrays[name].shape != shape:
                raise SnapshotError(f"replay snapshot {path}: {name} has the wrong shape")
            if arrays[name].dtype != dtype:
                raise SnapshotError(f"replay snapshot {path}: {name} is {arrays[name].dtype}, "
                                    f"not {dtype}")  # fmt: skip
        for name in self._SNAPSHOT_ARRAYS:
            getattr(self, name)[...] = arrays[name]
        for name, value in zip(self._SNAPSHOT_COUNTERS, counters[3:], strict=True):
            self._set_counter(name, int(value))
        self.tree.set(np.arange(self.config.capacity), arrays["leaves"])


def write_snapshot(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    """Writes snapshot arrays to one .npz (no pickle), atomically (a temp file, then rename)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
