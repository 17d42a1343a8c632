"""Prioritized replay: sampling statistics, IS weights, eviction, snapshots, rate limiting."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.experience import Chunk, ChunkError
from replay_server.rate_limiter import RateLimiter
from replay_server.replay import PrioritizedReplay, ReplayConfig, ReplayNotReady, SnapshotError


def make_chunk(length, priorities=None, stack=4, n=1, tag=0, first_value=0):
    """Frames whose pixels encode (tag, frame number) so samples can be traced back."""
    frame_count = length + stack - 1 + n
    frames = np.zeros((frame_count, 84, 84), np.uint8)
    frames[:, 0, 0] = tag
    frames[:, 0, 1] = (first_value + np.arange(frame_count)) % 256
    steps = np.arange(length)[:, None]
    obs_index = (steps + np.arange(stack)).astype(np.uint16)
    return Chunk(
        frames=frames,
        obs_index=obs_index,
        next_index=(obs_index + n).astype(np.uint16),
        actions=(np.arange(length) % 5).astype(np.uint8),
        returns=np.arange(length, dtype=np.float32),
        discounts=np.full(length, 0.9, np.float32),
        priorities=np.ones(length, np.float32) if priorities is None else priorities,
    )


def small_config(**overrides):
    values = dict(capacity=8, min_size_to_sample=1, priority_epsilon=1e-9, alpha=0.6)
    values.update(overrides)
    return ReplayConfig(**values)


def test_sampling_frequencies_match_priority_power_alpha():
    priorities = np.array([0.1, 0.5, 1.0, 2.0, 4.0, 8.0], np.float32)
    replay = PrioritizedReplay(small_config(capacity=6), seed=1)
    keys = replay.insert(make_chunk(6, priorities))
    draws = 200_000
    counts = np.zeros(6)
    for _ in range(draws // 500):
        sample = replay.sample(500, force=True)
        counts += np.bincount(sample.keys - keys[0], minlength=6)
    expected = priorities.astype(np.float64) ** 0.6
    expected /= expected.sum()
    np.testing.assert_allclose(counts / draws, expected, atol=0.004)
    # A uniform or p^1 sampler would miss by far more than the tolerance:
    assert np.abs(priorities / priorities.sum() - expected).max() > 0.05


def test_importance_weights_follow_the_formula():
    priorities = np.array([1.0, 2.0, 4.0, 8.0], np.float32)
    config = small_config(capacity=4, alpha=0.5, beta_start=0.4)
    replay = PrioritizedReplay(config, seed=0)
    replay.insert(make_chunk(4, priorities))
    sample = replay.sample(64, force=True)
    p_alpha = priorities.astype(np.float64) ** 0.5  # [1, 1.414, 2, 2.828]
    probabilities = p_alpha / p_alpha.sum()
    slots = sample.keys % 4
    np.testing.assert_allclose(sample.probabilities, probabilities[slots], rtol=1e-6)
    beta = 0.4  # nothing was sampled before this batch
    raw = (4 * probabilities[slots]) ** -beta
    np.testing.assert_allclose(sample.weights, raw / raw.max(), rtol=1e-5)
    assert sample.weights.max() == pytest.approx(1.0)


def test_beta_anneals_linearly():
    config = small_config(capacity=4, beta_start=0.4, beta_end=1.0, beta_anneal_samples=100)
    replay = PrioritizedReplay(config)
    replay.insert(make_chunk(4))
    assert replay.beta == pytest.approx(0.4)
    replay.sample(50, force=True)
    assert replay.beta == pytest.approx(0.7)
    replay.sample(100, force=True)
    assert replay.beta == pytest.approx(1.0)


def test_stale_key_updates_are_ignored():
    replay = PrioritizedReplay(small_config(capacity=4))
    old_keys = replay.insert(make_chunk(4))
    new_keys = replay.insert(make_chunk(2, tag=1))  # evicts keys 0 and 1 (FIFO)
    total_before = replay.tree.total
    updated = replay.update_priorities(old_keys[:2], np.array([100.0, 100.0]))
    assert updated == 0 and replay.tree.total == total_before
    updated = replay.update_priorities(new_keys, np.array([3.0, 3.0]))
    assert updated == 2 and replay.stats()["replay/priority_updates"] == 2  # stale ones not
    slots = new_keys % 4
    np.testing.assert_allclose(replay.tree.get(slots), (3.0 + 1e-9) ** 0.6)


def test_fifo_eviction_and_size():
    replay = PrioritizedReplay(small_config(capacity=8))
    replay.insert(make_chunk(5))
    replay.insert(make_chunk(5, tag=1))
    assert replay.size == 8
    tags = {int(replay.sample(64, force=True).obs[i, 0, 0, 0]) for i in range(64)}
    assert tags == {0, 1}
    replay.insert(make_chunk(8, tag=2))
    sample = replay.sample(64, force=True)
    assert set(sample.obs[:, 0, 0, 0].tolist()) == {2}


def test_transitions_whose_frames_were_overwritten_are_evicted():
    # 1 frame slot per transition: chunks carry stack-1+n extra frames, so frames run out
    # before transition slots do and the oldest transitions must be invalidated.
    config = small_config(capacity=1000, frames_per_transition=1.0)
    replay = PrioritizedReplay(config)
    for tag in range(30):
        replay.insert(make_chunk(50, tag=tag))
    assert replay.evicted_by_frames > 0
    watermark = replay.frames_inserted - replay.frame_capacity
    live = replay.keys >= 0
    assert np.all(replay.min_frame_id[live] >= watermark)
    assert replay.size == live.sum()
    assert np.all(replay.tree.get(np.flatnonzero(~live)) == 0)


def test_frame_ids_beyond_uint16_range():
    # Regression: chunk indices are uint16; frame ids passed 65,535 after ~62k transitions.
    replay = PrioritizedReplay(small_config(capacity=1000))
    for tag in range(700):
        replay.insert(make_chunk(100, tag=tag % 256))
    assert replay.frames_inserted > 65_536
    sample = replay.sample(32, force=True)
    assert set(sample.obs[:, 0, 0, 0].tolist()) <= {t % 256 for t in range(690, 700)}


def test_rate_limiter_by_hand():
    limiter = RateLimiter(samples_per_insert=2.0, min_size_to_sample=10, error_buffer=4.0)
    assert not limiter.can_sample(1, size=5)
    limiter.record_insert(10)
    assert limiter.can_sample(4, size=10)  # diff 0 − 4 = −4 >= −4
    assert not limiter.can_sample(5, size=10)
    limiter.record_insert(3)  # diff = 2·3 = 6 > 4: inserts are held back
    assert not limiter.can_insert(1, size=13)
    assert limiter.can_insert(1, size=9)  # the table lost items below min_size: it fills up
    assert limiter.can_insert(5, size=9)  # a batch too, whatever it takes the table to
    limiter.record_sample(2)  # diff 4
    assert limiter.can_insert(1, size=13)
    with pytest.raises(ValueError, match=r"samples_per_insert \(0\)"):
        RateLimiter(0, 1, 1)


def test_a_full_min_size_that_evictions_keep_out_of_reach_does_not_hold_both_sides():
    # min_size_to_sample = capacity, and short chunks (more frames per transition than the
    # frame ring was sized for) evict transitions for their overwritten frames: the table stays
    # below min_size (TrainConfig refuses such settings; the limiter must not hang on them).
    # Inserts must not be held while sampling cannot start.
    replay = PrioritizedReplay(small_config(capacity=200, min_size_to_sample=200))
    for inserted in range(0, 2_000, 5):
        assert replay.can_insert(5) or replay.can_sample(4), (replay.size, inserted)
        replay.insert(make_chunk(5, first_value=inserted))
    assert replay.evicted_by_frames > 0 and replay.size < 200


def test_sample_respects_the_rate_limiter():
    replay = PrioritizedReplay(small_config(capacity=64, min_size_to_sample=20))
    replay.insert(make_chunk(10))
    with pytest.raises(ReplayNotReady):
        replay.sample(4)
    replay.insert(make_chunk(10))
    assert replay.can_sample(4)
    replay.sample(4)


def test_bad_chunks_are_rejected_and_nothing_is_stored():
    replay = PrioritizedReplay(small_config(capacity=16))
    good = make_chunk(4)
    bad_chunks = [
        ({"obs_index": good.obs_index + 50}, "obs_index refers to frame 56 of 8"),
        ({"frames": good.frames.astype(np.float32)}, "frames must be uint8"),
        ({"returns": np.array([np.nan, 0, 0, 0], np.float32)}, "returns holds a non-finite"),
        ({"discounts": np.full(4, 1.5, np.float32)}, r"discounts must lie in \[0, 1\]"),
        ({"priorities": np.full(4, -1, np.float32)}, "priorities must be >= 0"),
        ({"actions": np.zeros(3, np.uint8)}, r"obs_index must be \[3, stack\]"),
    ]
    for change, message in bad_chunks:
        with pytest.raises(ChunkError, match=message):
            replay.insert(Chunk(**{**good.__dict__, **change}))
    assert replay.size == 0 and replay.frames_inserted == 0


def test_snapshot_round_trip(tmp_path):
    replay = PrioritizedReplay(small_config(capacity=32), seed=3)
    replay.insert(make_chunk(20, np.linspace(0.1, 2, 20).astype(np.float32)))
    replay.sample(8, force=True)
    replay.snapshot(tmp_path / "replay.npz")
    restored = PrioritizedReplay(small_config(capacity=32), seed=3)
    restored.restore(tmp_path / "replay.npz")
    assert restored.size == replay.size and restored.tree.total == pytest.approx(replay.tree.total)
    assert restored.limiter.samples == replay.limiter.samples
    np.testing.assert_array_equal(restored.frames, replay.frames)
    other = PrioritizedReplay(small_config(capacity=16))
    with pytest.raises(SnapshotError, match="capacity"):
        other.restore(tmp_path / "replay.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(SnapshotError, match=r"junk\.npz"):
        restored.restore(tmp_path / "junk.npz")


def _rewritten(path, **changes):
    with np.load(path) as data:
        arrays = {name: data[name] for name in data.files}
    arrays.update(changes)
    np.savez(path, **arrays)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "cannot read"),
        (lambda p: _rewritten(p, leaves=np.ones(31, np.float64)), "leaves has the wrong shape"),
        (lambda p: _rewritten(p, counters=np.array([32, 98, 4], np.int64)), "counters has the"),
        (lambda p: _rewritten(p, keys=np.zeros(8, np.int64)), "keys has the wrong shape"),
        (lambda p: _rewritten(p, keys=np.zeros(32, "<U3")), "keys is <U3, not int64"),
        (lambda p: _rewritten(p, counters=np.zeros(10, np.float32)), "wrong shape or type"),
    ],
)
def test_a_damaged_snapshot_is_a_snapshot_error_and_changes_nothing(tmp_path, damage, message):
    replay = PrioritizedReplay(small_config(capacity=32), seed=3)
    replay.insert(make_chunk(20, np.linspace(0.1, 2, 20).astype(np.float32)))
    path = tmp_path / "replay.npz"
    replay.snapshot(path)
    damage(path)
    target = PrioritizedReplay(small_config(capacity=32), seed=3)
    target.insert(make_chunk(5, tag=7))
    before = target.snapshot_arrays()
    with pytest.raises(SnapshotError, match=message):
        target.restore(path)
    for name, array in target.snapshot_arrays().items():
        np.testing.assert_array_equal(array, before[name], err_msg=name)


def test_bytes_per_transition_at_capacity_below_8kb():
    from common.experience import synthetic_chunk

    replay = PrioritizedReplay(ReplayConfig(capacity=20_000, min_size_to_sample=1))
    rng = np.random.default_rng(0)
    chunk = synthetic_chunk(rng, 100, n=3)
    for _ in range(201):
        replay.insert(chunk)
    assert replay.size == 20_000
    assert replay.nbytes() / replay.size <= 8 * 1024


@settings(max_examples=40, deadline=None)
@given(
    episode_lengths=st.lists(st.integers(1, 40), min_size=1, max_size=12),
    chunk_length=st.integers(1, 30),
    capacity=st.integers(40, 120),  # >= a chunk: chunk_length + n − 1 transitions
    frames_per_transition=st.floats(1.0, 1.5),
)
def test_sampled_states_never_mix_episodes_or_evicted_frames(
    episode_lengths, chunk_length, capacity, frames_per_transition
):
    """Real actor chunks (adder + builder) from two interleaved env slots into a small replay."""
    from actors.adder import ChunkBuilder, NStepAdder

    stack, n = 4, 3
    config = ReplayConfig(
        capacity=capacity,
        min_size_to_sample=1,
        frames_per_transition=frames_per_transition,
    )
    replay = PrioritizedReplay(config, stack=stack, seed=0)
    slots = []
    for slot in range(2):
        slots.append((NStepAdder(n, 0.9), ChunkBuilder(stack, chunk_length, n, 0, slot)))
    frame_ids = [0, 0]

    def new_frame(slot, episode, step):
        # Pixel (0,0) = env slot, (0,1) = episode, (0,2) = step: a frame says where it is from.
        frame = np.zeros((84, 84), np.uint8)
        frame[0, :3] = (slot, episode % 256, step % 256)
        slots[slot][1].add_frame(frame_ids[slot], frame)
        frame_ids[slot] += 1
        return frame_ids[slot] - 1

    def check(sample):
        for states in (sample.obs, sample.next_obs):
            for state in states:
                assert len({(int(f[0, 0]), int(f[0, 1])) for f in state}) == 1  # one episode
                steps = [int(f[0, 2]) for f in state]
                assert steps == sorted(steps)  # oldest first
        assert np.all(
            replay.min_frame_id[sample.keys % capacity]
            >= replay.frames_inserted - replay.frame_capacity
        )

    for episode, length in enumerate(episode_lengths):
        for slot, (adder, builder) in enumerate(slots):
            first = new_frame(slot, episode, 0)
            ids = [first] * stack
            adder.start(tuple(ids))
            for step in range(1, length + 1):
                ids = [*ids[1:], new_frame(slot, episode, step)]
                done = step == length
                for transition in adder.step(0, 1.0, 0.0, tuple(ids), done, False):
                    builder.add(transition, 1.0)
                if builder.ready():
                    replay.insert(builder.flush(0))
                    check(replay.sample(16, force=True))
    for _, builder in slots:
        chunk = builder.flush(0)
        if chunk is not None:
            replay.insert(chunk)
    if replay.size:
        check(replay.sample(64, force=True))
