"""Checkpoint sets: sealed by a manifest, rotated to previous/, verified on load; a torn or
corrupt set falls back to the previous one, and an error names the file and what is wrong."""

import contextlib
import json

import pytest
import torch

from learner.checkpoint import (
    MANIFEST_NAME,
    PREVIOUS_DIR,
    SET_DIR_KEY,
    CheckpointError,
    check_set,
    holds_checkpoint,
    load_checkpoint,
    resolve_set,
    rotate_set,
    save_checkpoint,
    write_manifest,
)


def _write_set(run_dir, env_steps):
    rotate_set(run_dir)
    (run_dir / "replay-0.npz").write_bytes(bytes([env_steps % 256]) * 1000)
    payload = {"learner": {"w": torch.full((3,), float(env_steps))}, "config": {},
               "counters": {"env_steps": env_steps}}  # fmt: skip
    save_checkpoint(run_dir, payload)
    write_manifest(run_dir, ["checkpoint.pt", "replay-0.npz"], env_steps)


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-10])


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


def test_sets_rotate_and_the_newest_whole_one_loads(tmp_path):
    _write_set(tmp_path, 100)
    _write_set(tmp_path, 200)
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["env_steps"] == 200
    assert json.loads((tmp_path / PREVIOUS_DIR / MANIFEST_NAME).read_text())["env_steps"] == 100
    payload = load_checkpoint(tmp_path)
    assert payload["counters"]["env_steps"] == 200 and payload[SET_DIR_KEY] == tmp_path


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda d: _truncate(d / "replay-0.npz"), "replay-0.npz: truncated"),
        (lambda d: _flip(d / "checkpoint.pt"), "checkpoint.pt: checksum mismatch"),
        (lambda d: (d / MANIFEST_NAME).unlink(), "manifest.json: missing"),  # a torn set
        (lambda d: (d / "replay-0.npz").unlink(), "replay-0.npz: missing"),
    ],
)
def test_a_bad_set_falls_back_to_the_previous_one(tmp_path, caplog, damage, reason):
    _write_set(tmp_path, 100)
    _write_set(tmp_path, 200)
    damage(tmp_path)
    assert reason in check_set(tmp_path)
    with caplog.at_level("WARNING", logger="checkpoint"):
        payload = load_checkpoint(tmp_path)
    assert payload["counters"]["env_steps"] == 100
    assert payload[SET_DIR_KEY] == tmp_path / PREVIOUS_DIR == resolve_set(tmp_path)
    assert reason in caplog.text and "falling back to the previous set" in caplog.text


def test_no_whole_set_is_an_error_naming_file_and_reason(tmp_path):
    _write_set(tmp_path, 100)
    _write_set(tmp_path, 200)
    _truncate(tmp_path / "checkpoint.pt")
    _flip(tmp_path / PREVIOUS_DIR / "replay-0.npz")
    with pytest.raises(CheckpointError, match=r"checkpoint.pt: truncated.*previous.*replay-0.npz: "
                       r"checksum mismatch"):  # fmt: skip
        load_checkpoint(tmp_path)


def test_a_crash_after_rotation_leaves_the_previous_set(tmp_path):
    _write_set(tmp_path, 100)
    rotate_set(tmp_path)  # the next set began: the current one moved, nothing new sealed yet
    (tmp_path / "replay-0.npz").write_bytes(b"half")
    assert load_checkpoint(tmp_path)["counters"]["env_steps"] == 100
    # --resume-existing (and a branch restarted) must see it as a run that has a checkpoint
    assert holds_checkpoint(tmp_path) and not holds_checkpoint(tmp_path / "empty")


def test_a_run_from_before_the_manifests_loads_as_it_is(tmp_path):
    save_checkpoint(tmp_path, {"learner": {}, "config": {}, "counters": {"env_steps": 7}})
    assert load_checkpoint(tmp_path)["counters"]["env_steps"] == 7
    rotate_set(tmp_path)  # not a whole set: stays where it is
    assert (tmp_path / "checkpoint.pt").exists() and not (tmp_path / PREVIOUS_DIR).exists()


class _Crash(Exception):
    pass


@pytest.mark.parametrize("after", [False, True])
@pytest.mark.parametrize("crash_at", range(9))
def test_a_crash_anywhere_in_a_rotation_leaves_the_newest_set_whole(
    tmp_path, monkeypatch, crash_at, after
):
    """Each file-system step of rotate_set in turn is the last one (the process dies just
    before it, or just after): the newest whole set still loads, from run_dir or previous/."""
    _write_set(tmp_path, 100)
    _write_set(tmp_path, 200)
    steps = []

    def dying(function):
        def step(*args, **kwargs):
            steps.append(function.__name__)
            if len(steps) - 1 == crash_at and not after:
                raise _Crash
            result = function(*args, **kwargs)
            if len(steps) - 1 == crash_at:
                raise _Crash
            return result

        return step

    import learner.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint.os, "link", dying(checkpoint.os.link))
    monkeypatch.setattr(checkpoint.shutil, "rmtree", dying(checkpoint.shutil.rmtree))
    monkeypatch.setattr(type(tmp_path), "rename", dying(type(tmp_path).rename))
    monkeypatch.setattr(type(tmp_path), "unlink", dying(type(tmp_path).unlink))
    with contextlib.suppress(_Crash):
        rotate_set(tmp_path)
    monkeypatch.undo()
    # rmtree ×2, link ×3, rename, unlink ×3: 9 steps, each one the last in some case
    assert len(steps) > crash_at
    assert load_checkpoint(tmp_path)["counters"]["env_steps"] == 200


def test_a_restarted_shard_finds_the_newest_sets_snapshot(tmp_path):
    from launch.trainer import newest_snapshot

    assert newest_snapshot(tmp_path, 0) is None  # no set yet: the shard starts empty
    (tmp_path / "replay-0.npz").write_bytes(b"a run from before the manifests")
    assert newest_snapshot(tmp_path, 0) == tmp_path / "replay-0.npz"
    _write_set(tmp_path, 100)
    assert newest_snapshot(tmp_path, 0) == tmp_path / "replay-0.npz"
    rotate_set(tmp_path)  # a new set is being written: the last whole one is in previous/
    assert newest_snapshot(tmp_path, 0) == tmp_path / PREVIOUS_DIR / "replay-0.npz"
    (tmp_path / "replay-0.npz").write_bytes(b"half")  # the new one, not yet sealed
    assert newest_snapshot(tmp_path, 0) == tmp_path / PREVIOUS_DIR / "replay-0.npz"
    assert newest_snapshot(tmp_path, 1) is None  # no such shard in the set
    _write_set(tmp_path, 200)
    _truncate(tmp_path / "replay-0.npz")  # the newest set's copy is short: the previous one
    assert newest_snapshot(tmp_path, 0) == tmp_path / PREVIOUS_DIR / "replay-0.npz"


def test_without_hard_links_the_rotation_copies(tmp_path, monkeypatch, caplog):
    import learner.checkpoint as checkpoint

    _write_set(tmp_path, 100)

    def no_links(source, target):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(checkpoint.os, "link", no_links)
    with caplog.at_level("WARNING", logger="checkpoint"):
        _write_set(tmp_path, 200)
    assert "hard links failed" in caplog.text
    assert (tmp_path / PREVIOUS_DIR / "replay-0.npz").read_bytes() == bytes([100]) * 1000
    assert check_set(tmp_path / PREVIOUS_DIR) is None and check_set(tmp_path) is None
