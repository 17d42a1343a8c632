"""Reverb-style samples-per-insert rate limiting: explicit checks, never sleeps."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class RateLimiter:
    """Keeps sampled items ≈ samples_per_insert × inserted items, within ± error_buffer.

    Sampling waits for `min_size_to_sample` items. After that, with
    `diff = samples_per_insert · (inserts − min_size_to_sample) − samples`, a sample of n
    items is allowed while diff − n >= −error_buffer, and an insert while diff <= error_buffer
    or while the table holds fewer than `min_size_to_sample` items (as Reverb's: a table that
    evicted items below it, e.g. for their overwritten frames, fills up again rather than
    hold both sides for ever).
    A learner that outpaces the actors is held back (no overfitting a starved buffer); actors
    that outpace the learner are held back (it never falls hopelessly behind).
    """

    samples_per_insert: float
    min_size_to_sample: int
    error_buffer: float
    inserts: int = 0
    samples: int = 0

    def __post_init__(self) -> None:
        if self.samples_per_insert <= 0:
            raise ValueError(f"samples_per_insert ({self.samples_per_insert}) must be > 0")
        if self.min_size_to_sample < 1:
            raise ValueError(f"min_size_to_sample ({self.min_size_to_sample}) must be >= 1")
        if self.error_buffer < 1:
            raise ValueError(f"error_buffer ({self.error_buffer}) must be >= 1")

    def _diff(self) -> float:
        return self.samples_per_insert * (self.inserts - self.min_size_to_sample) - self.samples

    def can_sample(self, n: int, size: int) -> bool:
        """Whether n items may be sampled now from a table holding `size` valid items."""
        if size < self.min_size_to_sample:
            return False
        return self._diff() - n >= -self.error_buffer

    def can_insert(self, n: int, size: int) -> bool:
        """Whether n more items may be inserted now into a table holding `size` valid items."""
        if size < self.min_size_to_sample:
            return True
        return self._diff() <= self.error_buffer

    def record_insert(self, n: int) -> None:
        self.inserts += n

    def record_sample(self, n: int) -> None:
        self.samples += n
