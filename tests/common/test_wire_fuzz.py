"""Property-based fuzzing of decode_chunk: whatever arrives, it is rejected with a WireError or
decoded to a chunk that passes validation; never another exception, never a crash.

Three kinds of input: raw bytes; a real message with random bytes flipped, cut or appended; and,
past the CRC gate, messages with a valid checksum whose header fields and lz4 body are generated
(the part a checksum cannot protect: a hostile sender computes its own), both random and
plausible (a real chunk with a few fields, shapes or values changed and a body of the promised
size, which reaches the checks past the body, as a test asserts). The default suite runs
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


_ITEMSIZE = {"|u1": 1, "<u2": 2, "<f4": 4, "<f2": 2, "<i8": 8}


def _header_and_arrays(message: bytes) -> tuple[dict, list[list]]:
    """A real message's header, and its arrays as [name, dtype, shape, bytes]."""
    length = struct.unpack_from("<I", message, 4)[0]
    header = msgpack.unpackb(message[12 : 12 + length])
    body = lz4.frame.decompress(message[12 + length :])
    arrays, offset = [], 0
    for name, dtype, shape in header["arrays"]:
        size = _ITEMSIZE[dtype] * int(np.prod(shape))
        arrays.append([name, dtype, list(shape), body[offset : offset + size]])
        offset += size
    return header, arrays


def plausible_message(rng: np.random.Generator) -> bytes:
    """A real chunk message with 0–3 plausible changes (header fields, an array's shape, dtype,
    name or values), resealed with a body of exactly the size its header promises: the input
    that gets past the CRC, size and lz4 gates to the checks of fields, shapes and values."""
    header, arrays = _header_and_arrays(MESSAGE)
    for _ in range(int(rng.integers(0, 4))):
        index = int(rng.integers(len(arrays)))
        name, dtype, shape, data = arrays[index]
        change = int(rng.integers(11))
        if change == 0:
            header["run_id"] = "other"
        elif change == 1:
            header["count"] += int(rng.choice([-1, 1, -header["count"]]))
        elif change == 2:
            header["frame_count"] += int(rng.choice([-1, 1]))
        elif change == 3:
            header["stack"] = int(rng.choice([3, 5]))
        elif change == 4:
            header[str(rng.choice(["actor_id", "env_slot", "policy_version"]))] = -1
        elif change == 5 and shape:  # one dimension off by one; its bytes follow the shape
            dim = int(rng.integers(len(shape)))
            shape = [*shape[:dim], max(shape[dim] + int(rng.choice([-1, 1])), 0), *shape[dim + 1 :]]
            arrays[index] = [name, dtype, shape, rng.bytes(_ITEMSIZE[dtype] * int(np.prod(shape)))]
        elif change == 6:  # another allowed dtype
            dtype = str(rng.choice(sorted(_ITEMSIZE)))
            arrays[index] = [name, dtype, shape, rng.bytes(_ITEMSIZE[dtype] * int(np.prod(shape)))]
        elif change == 7:
            arrays[index][0] = str(rng.choice(["extra", _ARRAYS[(index + 1) % len(_ARRAYS)]]))
        elif change == 8:
            del arrays[index]
        else:  # random values of the right size: indices, actions, discounts, NaNs ...
            arrays[index][3] = rng.bytes(len(data))
    header["arrays"] = [[name, dtype, shape] for name, dtype, shape, _ in arrays]
    header_bytes = msgpack.packb(header)
    body = lz4.frame.compress(b"".join(data for *_, data in arrays))
    checksum = zlib.crc32(header_bytes + body)
    return b"MRO2" + struct.pack("<II", len(header_bytes), checksum) + header_bytes + body


def _outcome(data: bytes) -> str:
    """ "decoded" (after _check's checks of the chunk), or the WireError's text."""
    try:
        decode_chunk(data, RUN_ID, stack=4, num_actions=5)
    except WireError as error:
        return str(error)
    assert _check(data) == "decoded"
    return "decoded"


def test_plausible_messages_reach_the_checks_past_the_body():
    # The fuzzing below is only as good as the gates its input reaches: these must include the
    # header fields, the array specs, the counts and the chunk's own validation, and some
    # changed messages must still decode (e.g. new priorities are a valid chunk).
    outcomes = {_outcome(plausible_message(np.random.default_rng(seed))) for seed in range(400)}
    reached = [
        "decoded", "run_id 'other'", "header.count", "header.actor_id", "stack 3",
        "unexpected array", "missing arrays", "header counts", "action ", "obs_index ",
    ]  # fmt: skip
    missed = [gate for gate in reached if not any(o.startswith(gate) for o in outcomes)]
    assert not missed, sorted(outcomes)


@FAST
@given(st.integers(0, 2**32 - 1))
def test_plausible_generated_messages_are_rejected_or_valid(seed):
    _check(plausible_message(np.random.default_rng(seed)))


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
@given(
    st.one_of(
        raw_bytes,
        damaged_messages(),
        sealed_messages(),
        st.integers(0, 2**32 - 1).map(lambda s: plausible_message(np.random.default_rng(s))),
    )
)
def test_ten_thousand_cases_never_crash(data):
    _check(data)
