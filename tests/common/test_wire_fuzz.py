"""Property-based fuzzing of decode_chunk: whatever arrives, it is rejected with a WireError or
decoded to a chunk that passes validation; never another exception, never a crash.

Three kinds of input: raw bytes; a real message with random bytes flipped, cut or appended; and,
past the CRC gate, messages with a valid checksum whose header fields and lz4 body are generated
(the part a checksum cannot protect: a hostile sender computes its own). The default suite runs
a few hundred cases; `pytest -m slow tests/common/test_wire_fuzz.py` runs 10,000 of each kind.
"""

import struct
import zlib

import lz4.frame
import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.experience import Chunk, synthetic_chunk
from common.wire import WireError, decode_chunk, encode_chunk

RUN_ID = "run-a"
MESSAGE = encode_chunk(synthetic_chunk(np.random.default_rng(0), 12), RUN_ID)
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LONG = settings(max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck))


def _check(data: bytes) -> str:
    """Decodes; returns "rejected" or "decoded" (after checking the chunk), or raises."""
    try:
        chunk = decode_chunk(data, RUN_ID, stack=4, num_actions=5)
    except WireError:
        return "rejected"
    assert isinstance(chunk, Chunk)
    chunk.validate(num_actions=5)  # raises if what came out is not a usable chunk
    assert chunk.frames.dtype == np.uint8 and chunk.frames.shape[1:] == (84, 84)
    return "decoded"


raw_bytes = st.binary(max_size=2048)


@st.composite
def damaged_messages(draw) -> bytes:
    data = bytearray(MESSAGE)
    for _ in range(draw(st.integers(1, 6))):
        position = draw(st.integers(0, len(data) - 1))
        data[position] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data) + draw(st.binary(max_size=16))


_ARRAYS = ["frames", "obs_index", "next_index", "actions", "returns", "discounts", "priorities"]
_DTYPES = ["|u1", "<u2", "<f4", "<f2", "<i8", "<f8", "x"]


@st.composite
def sealed_messages(draw) -> bytes:
    """Messages with a correct CRC-32 and generated content."""
    count = draw(st.integers(-2, 40))
    shape = st.lists(st.integers(-1, 90), min_size=0, max_size=4)
    arrays = draw(st.lists(st.tuples(st.sampled_from([*_ARRAYS, "extra"]),
                                     st.sampled_from(_DTYPES), shape), max_size=9))  # fmt: skip
    header = {
        "schema": draw(st.sampled_from([1, 1, 1, 2, "1", None])),
        "kind": draw(st.sampled_from(["chunk", "chunk", "weights", 3])),
        "run_id": draw(st.sampled_from([RUN_ID, RUN_ID, "other", b"run-a"])),
        "actor_id": draw(st.integers(-3, 2**33)),
        "env_slot": draw(st.integers(-1, 10)),
        "policy_version": draw(st.one_of(st.integers(-1, 2**40), st.floats(), st.none())),
        "count": count,
        "frame_count": draw(st.integers(-1, 60)),
        "stack": draw(st.sampled_from([4, 4, 3, 0, True])),
        "arrays": [[name, dtype, dims] for name, dtype, dims in arrays],
    }
    if draw(st.booleans()):
        del header[draw(st.sampled_from(sorted(header)))]
    header_bytes = msgpack.packb(header)
    content = draw(st.one_of(st.binary(max_size=4096),
                             st.integers(0, 200_000).map(bytes)))  # fmt: skip
    body = lz4.frame.compress(content) if draw(st.booleans()) else draw(st.binary(max_size=64))
    checksum = zlib.crc32(header_bytes + body)
    return b"MRO2" + struct.pack("<II", len(header_bytes), checksum) + header_bytes + body


@FAST
@given(raw_bytes)
def test_raw_bytes_are_rejected(data):
    assert _check(data) == "rejected"


@FAST
@given(damaged_messages())
def test_damaged_messages_are_rejected_or_unchanged(data):
    if _check(data) == "decoded":
        assert data == MESSAGE  # only an undamaged message decodes (the CRC sees the rest)


@FAST
@given(sealed_messages())
def test_sealed_generated_messages_are_rejected_or_valid(data):
    _check(data)


@pytest.mark.slow
@LONG
@given(st.one_of(raw_bytes, damaged_messages(), sealed_messages()))
def test_ten_thousand_cases_never_crash(data):
    _check(data)
