"""Checkpoints: tensors and plain values only, loaded with torch.load(weights_only=True)."""

from __future__ import annotations

import pathlib

import torch

CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"
"""The online weights of the run's best evaluation, in the checkpoint format (learner.online)."""
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or not one of ours."""


def save_checkpoint(
    run_dir: pathlib.Path, payload: dict, name: str = CHECKPOINT_NAME
) -> pathlib.Path:
    """Writes run_dir/name atomically (write to a temp file, then rename)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / name
    tmp = path.with_suffix(".pt.tmp")
    torch.save({"format": FORMAT_VERSION, **payload}, tmp)
    tmp.replace(path)
    return path


def load_checkpoint(path: pathlib.Path) -> dict:
    """Loads a checkpoint file, or run_dir/checkpoint.pt when given a run directory.

    Raises:
        CheckpointError: naming the path and the problem.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or foreign files
        raise CheckpointError(f"cannot load checkpoint {path}: {error}") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a format-{FORMAT_VERSION} mario checkpoint")
    for key in ("learner", "config", "counters"):
        if key not in payload:
            raise CheckpointError(f"checkpoint {path} lacks {key!r}")
    return payload
