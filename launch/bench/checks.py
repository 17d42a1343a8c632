"""What a bench checks before it measures anything: the core it pins itself to (`--cpu`) and
the file its JSON goes to (`--out`), so that a bad one does not cost a measurement."""

from __future__ import annotations

import os
import pathlib


def check_cpu(cpu: int | None) -> None:
    """Raises ValueError, naming the cores it may use, unless `cpu` is one of them (or None)."""
    usable = sorted(os.sched_getaffinity(0))
    if cpu is not None and cpu not in usable:
        raise ValueError(f"cpu ({cpu}) is not a core this process may run on: {usable} (or None)")


def prepare_out(out: pathlib.Path) -> None:
    """Makes the folder of `out`; raises (naming it) unless the JSON can be written there."""
    if out.is_dir():
        raise ValueError(f"out ({out}) is a directory: give the path of the JSON file")
    out.parent.mkdir(parents=True, exist_ok=True)  # OSError naming the path if it cannot
    if not os.access(out.parent, os.W_OK):
        raise PermissionError(f"out ({out}): cannot write in {out.parent}")
