"""Checkpoints: tensors and plain values only, loaded with torch.load(weights_only=True).

A run directory's checkpoint is one set of files: checkpoint.pt and the replay snapshots
(replay-0.npz, …), with manifest.json written last, naming each file with its size and SHA-256.
Before a new set is written the current one moves to previous/. Loading a run directory takes
the newest set whose files match their manifest; a torn set (a crash while writing: no manifest
yet) or a corrupt one ("truncated", "checksum mismatch") falls back to previous/, with a
warning; if no set is whole, the error names the file and what is wrong with it. A run from
before the manifests (checkpoint.pt and no manifest anywhere) loads as it is.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import pathlib
import shutil

import torch

logger = logging.getLogger("checkpoint")
MANIFEST_NAME = "manifest.json"
PREVIOUS_DIR = "previous"
SET_DIR_KEY = "set_dir"
"""Key of a loaded payload naming the directory its set came from (not saved)."""

CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"
"""The weights of the run's best evaluation, in the checkpoint format, under learner.online: the
average of the weights when the run keeps one (the default), else the online net's."""
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or not one of ours."""


def round_name(env_steps: int) -> str:
    """The file, in <run>/eval/, of the weights the evaluation round at `env_steps` evaluated
    (a checkpoint like best.pt: learner.online, config, counters, eval)."""
    return f"round-{env_steps:09d}.pt"


def kept_rounds(run_dir: pathlib.Path) -> dict[int, pathlib.Path]:
    """The round weights a run kept in <run>/eval/: env steps → file, oldest first. Files of
    other names (round-copy.pt) are not rounds."""
    paths = sorted(pathlib.Path(run_dir, "eval").glob("round-*.pt"))
    return {int(path.stem[6:]): path for path in paths if path.stem[6:].isdecimal()}


def check_average(average: int) -> None:
    """Raises ValueError, naming it, unless `average` (rounds to average) is odd and >= 1."""
    if average < 1 or average % 2 == 0:
        raise ValueError(f"average ({average}) must be an odd number >= 1: the rounds are centred "
                         "on one")  # fmt: skip


def round_window(steps: list[int], centre: int, width: int) -> list[int]:
    """The `width` rounds of `steps` (ascending env steps) centred on `centre`; fewer where the
    first or last round cuts the window.

    Raises:
        ValueError: `width` is not odd and >= 1, or more than there are rounds (naming both).
    """
    check_average(width)
    if width > len(steps):
        raise ValueError(f"average ({width}) is more than the {len(steps)} usable rounds")
    index, half = steps.index(centre), width // 2
    return steps[max(0, index - half) : index + half + 1]


def averaged_round(rounds: dict[int, pathlib.Path], centre: int, width: int) -> dict:
    """Round `centre`'s payload with its online weights replaced by the mean of the weights of
    the `width` rounds centred on it (round_window over `rounds`: env steps → file), parameter
    by parameter; `averaged_rounds` names them. DQN's greedy policy churns between rounds (a
    few updates reorder nearly equal Q-values); a mean of neighbouring rounds smooths that out.

    Raises:
        CheckpointError: no round at `centre`, or a window's round cannot be read or does not
            fit the others (naming it).
    """
    if centre not in rounds:
        raise CheckpointError(f"round ({centre}): no kept round weights at {centre} env steps; "
                              f"kept: {sorted(rounds) or 'none'}")  # fmt: skip
    window = round_window(sorted(rounds), centre, width)
    payloads = {steps: load_checkpoint(rounds[steps]) for steps in window}
    payload = payloads[centre]
    ours = payload["learner"]["online"]
    for steps, other in payloads.items():
        theirs = other["learner"]["online"]
        wrong = sorted(set(theirs) ^ set(ours)) or [
            name for name, tensor in ours.items() if theirs[name].shape != tensor.shape
        ]
        if wrong:
            raise CheckpointError(f"{rounds[steps]}: its weights ({wrong[0]}) do not fit those "
                                  f"of {rounds[centre]}: not one run's rounds")  # fmt: skip
    average = {
        name: (
            sum(p["learner"]["online"][name].float() for p in payloads.values()) / len(window)
        ).to(tensor.dtype)
        if tensor.is_floating_point()
        else tensor
        for name, tensor in ours.items()
    }
    return {**payload, "learner": {**payload["learner"], "online": average},
            "averaged_rounds": window}  # fmt: skip


def save_checkpoint(
    run_dir: pathlib.Path, payload: dict, name: str = CHECKPOINT_NAME
) -> pathlib.Path:
    """Writes run_dir/name atomically and durably (a temp file, synced, then renamed)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / name
    tmp = path.with_suffix(".pt.tmp")
    torch.save({"format": FORMAT_VERSION, **payload}, tmp)
    durable_replace(tmp, path)
    return path


def durable_replace(tmp: pathlib.Path, path: pathlib.Path) -> None:
    """Renames a written temp file over `path`, its data synced to disk first and the rename
    after (a power loss leaves the old file or the new one, not an empty one)."""
    with open(tmp, "rb") as file:
        os.fsync(file.fileno())
    tmp.replace(path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    except OSError as error:  # some network and FUSE mounts refuse it: the rename stands
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
        _warn_once(f"{path.parent}: the directory cannot be synced ({error.strerror})")
    finally:
        os.close(directory)


def file_digest(path: pathlib.Path) -> dict:
    """Size and SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 22):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def rotate_set(run_dir: pathlib.Path) -> None:
    """Makes the current set (if whole) the one in previous/: called before a new set is
    written, so a crash while writing it leaves the previous set to fall back to.

    A crash at any point leaves a whole set: the files are hard-linked into previous.tmp/, which
    then replaces previous/ by rename, and only then are run_dir's manifest and files removed."""
    if check_set(run_dir) is not None:
        return  # torn or absent: nothing worth keeping over what previous/ holds
    previous, staging = run_dir / PREVIOUS_DIR, run_dir / (PREVIOUS_DIR + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    manifest = json.loads((run_dir / MANIFEST_NAME).read_text())
    for name in [*manifest["files"], MANIFEST_NAME]:
        link_or_copy(run_dir / name, staging / name)
    shutil.rmtree(previous, ignore_errors=True)  # run_dir's set is whole meanwhile
    staging.rename(previous)
    for name in [MANIFEST_NAME, *manifest["files"]]:
        (run_dir / name).unlink()


def link_or_copy(source: pathlib.Path, target: pathlib.Path) -> None:
    """A hard link (set files are replaced by rename, never written in place), else a copy (a
    filesystem without hard links: slower, warned once per directory)."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError as error:
        _warn_once(f"hard links failed in {target.parent} ({error}): files are copied")
        shutil.copy2(source, target)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning("%s", message)


def write_manifest(run_dir: pathlib.Path, names: list[str], env_steps: int) -> None:
    """Seals the set: the files' sizes and checksums, written atomically, last."""
    files = {name: file_digest(run_dir / name) for name in names}
    tmp = run_dir / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps({"env_steps": env_steps, "files": files}, indent=1) + "\n")
    durable_replace(tmp, run_dir / MANIFEST_NAME)


def check_set(set_dir: pathlib.Path) -> str | None:
    """None if the set in `set_dir` matches its manifest, else what is wrong, naming the file."""
    manifest_path = set_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        return f"{manifest_path}: missing (the set was not finished)"
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{manifest_path}: unreadable ({error})"
    for name, expected in files.items():
        path = set_dir / name
        if not path.is_file():
            return f"{path}: missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            kind = "truncated" if size < expected["bytes"] else "longer than its manifest says"
            return f"{path}: {kind} ({size:,} of {expected['bytes']:,} bytes)"
        if file_digest(path)["sha256"] != expected["sha256"]:
            return f"{path}: checksum mismatch"
    return None


def resolve_set(run_dir: pathlib.Path) -> pathlib.Path:
    """The directory of the run's newest whole checkpoint set (run_dir or run_dir/previous).

    Raises:
        CheckpointError: no whole set, naming the file and what is wrong.
    """
    previous = run_dir / PREVIOUS_DIR
    if not (run_dir / MANIFEST_NAME).exists() and not (previous / MANIFEST_NAME).exists():
        return run_dir  # a run from before the manifests
    problem = check_set(run_dir)
    if problem is None:
        return run_dir
    fallback = check_set(previous)
    if fallback is None:
        logger.warning("checkpoint set in %s is not whole (%s); falling back to the previous set "
                       "in %s", run_dir, problem, previous)  # fmt: skip
        return previous
    raise CheckpointError(f"no whole checkpoint in {run_dir}: {problem}; previous: {fallback}")


def newest_set_file(run_dir: pathlib.Path, name: str) -> pathlib.Path | None:
    """The newest set's copy of file `name` (run_dir, else previous/) whose size matches its
    manifest, or run_dir/name in a run from before the manifests; None if there is none. Cheap
    (no checksums), for a role that restarts in mid-run while the trainer may be rotating."""
    manifests = 0
    for set_dir in (run_dir, run_dir / PREVIOUS_DIR):
        try:
            files = json.loads((set_dir / MANIFEST_NAME).read_text())["files"]
        except FileNotFoundError:
            continue
        except (OSError, ValueError, KeyError, TypeError):
            manifests += 1
            continue
        manifests += 1
        path = set_dir / name
        with contextlib.suppress(OSError, KeyError, TypeError):
            if path.stat().st_size == files[name]["bytes"]:
                return path
    legacy = run_dir / name
    return legacy if manifests == 0 and legacy.is_file() else None


def holds_checkpoint(run_dir: pathlib.Path) -> bool:
    """Whether a run directory holds a checkpoint set, its previous one included: a run killed
    while rotating its set (previous/ written, the new checkpoint.pt not yet) still has one."""
    run_dir = pathlib.Path(run_dir)
    return any((d / CHECKPOINT_NAME).is_file() for d in (run_dir, run_dir / PREVIOUS_DIR))


def load_checkpoint(path: pathlib.Path) -> dict:
    """Loads a checkpoint file, or the newest whole set's checkpoint.pt of a run directory
    (the payload's "set_dir" then names its directory, where its replay snapshots are).

    Raises:
        CheckpointError: naming the path and the problem.
    """
    path = pathlib.Path(path)
    set_dir = None
    if path.is_dir():
        set_dir = resolve_set(path)
        path = set_dir / CHECKPOINT_NAME
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
    if set_dir is not None:
        payload[SET_DIR_KEY] = set_dir
    return payload
