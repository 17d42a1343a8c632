"""The core a bench pins itself to (`--cpu`), checked before it measures anything."""

from __future__ import annotations

import os


def check_cpu(cpu: int | None) -> None:
    """Raises ValueError, naming the cores it may use, unless `cpu` is one of them (or None)."""
    usable = sorted(os.sched_getaffinity(0))
    if cpu is not None and cpu not in usable:
        raise ValueError(f"cpu ({cpu}) is not a core this process may run on: {usable} (or None)")
