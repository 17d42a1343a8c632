"""Wire format: exact round trips, and typed errors (never a crash) on corrupt input."""

import pathlib
import struct
import subprocess
import sys
import zlib

import lz4.frame
import msgpack
import numpy as np
import pytest
import torch

from common.experience import synthetic_chunk
from common.networks import QNetwork
from common.wire import (
    WireError,
    decode_chunk,
    decode_record,
    decode_weights,
    encode_chunk,
    encode_weights,
)


def test_chunk_round_trip():
    chunk = synthetic_chunk(np.random.default_rng(0), 50)
    chunk = type(chunk)(**{**chunk.__dict__, "actor_id": 3, "env_slot": 2, "policy_version": 9})
    decoded = decode_chunk(encode_chunk(chunk, "run-a"), "run-a", stack=4, num_actions=5)
    for name in ("frames", "obs_index", "next_index", "actions", "returns", "discounts",
                 "priorities"):  # fmt: skip
        np.testing.assert_array_equal(getattr(decoded, name), getattr(chunk, name))
    assert (decoded.actor_id, decoded.env_slot, decoded.policy_version) == (3, 2, 9)


def test_weights_round_trip_and_shape_check():
    network = QNetwork(5)
    blob = encode_weights(network.state_dict(), version=42)
    state, version = decode_weights(blob, network.state_dict())
    assert version == 42
    for name, tensor in network.state_dict().items():
        torch.testing.assert_close(state[name], tensor)
    with pytest.raises(WireError, match="differing"):
        decode_weights(blob, QNetwork(7).state_dict() | {"extra": torch.zeros(1)})
    with pytest.raises(WireError, match="shape"):
        decode_weights(blob, QNetwork(7).state_dict())


def test_an_empty_bf16_tensor_is_a_shape_error_not_a_crash():
    # torch.frombuffer refuses an empty buffer with a plain ValueError, which once escaped the
    # actor's `except WireError` and ended the run
    network = QNetwork(5)
    state = {name: tensor.to(torch.bfloat16) for name, tensor in network.state_dict().items()}
    state["head.2.bias"] = torch.zeros((0, 3), dtype=torch.bfloat16)
    blob = encode_weights(state, version=1)
    decoded, _ = decode_weights(blob)
    assert decoded["head.2.bias"].shape == (0, 3) and decoded["head.2.bias"].dtype == torch.bfloat16
    with pytest.raises(WireError, match="shape"):
        decode_weights(blob, network.state_dict())


@pytest.mark.parametrize(
    ("record", "error"),
    [
        ({b"learner/loss": 1.0}, "field name b'learner/loss' is bytes, not str"),
        ({"learner/loss": [1.0]}, "field 'learner/loss' is list, not a scalar"),
        ([1, 2], "not a map"),
    ],
)
def test_a_record_must_map_text_names_to_scalars(record, error):
    with pytest.raises(WireError, match=error):
        decode_record(msgpack.packb(record))


def _header_swap(message: bytes, body: bytes | None = None, **changes) -> bytes:
    """The message with header fields (or the lz4 body) replaced and a valid CRC-32."""
    length = int.from_bytes(message[4:8], "little")
    header = msgpack.unpackb(message[12 : 12 + length])
    header.update(changes)
    return reseal(msgpack.packb(header), message[12 + length :] if body is None else body)


def reseal(header: bytes, body: bytes) -> bytes:
    checksum = zlib.crc32(header + body)
    return b"MRO2" + struct.pack("<II", len(header), checksum) + header + body


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda m: b"", "bad magic"),
        (lambda m: b"XXXX" + m[4:], "bad magic"),
        (lambda m: m[:20], "header"),
        (lambda m: m[:-10], "checksum mismatch"),
        (lambda m: m[:12] + bytes([m[12] ^ 4]) + m[13:], "checksum mismatch"),
        (lambda m: m[:-1] + bytes([m[-1] ^ 1]), "checksum mismatch"),
        (lambda m: _header_swap(m, body=m[-30:]), "lz4"),
        (lambda m: _header_swap(m, body=lz4.frame.compress(bytes(20_000_000))), "more than"),
        (lambda m: _header_swap(m, body=lz4.frame.compress(b"short")), "body has 5 bytes"),
        (lambda m: _header_swap(m, body=m[m.index(b"\x04\x22\x4d\x18") :] + b"x"), "trailing"),
        (lambda m: _header_swap(m, run_id="other"), "run_id"),
        (lambda m: _header_swap(m, schema=2), "schema"),
        (lambda m: _header_swap(m, kind="weights"), "kind"),
        (lambda m: _header_swap(m, count=7), "counts disagree"),
        (lambda m: _header_swap(m, stack=3), "stack"),
        (lambda m: _header_swap(m, actor_id=-1), "actor_id"),
        (lambda m: _header_swap(m, arrays=[["frames", "<f8", [1, 84, 84]]]), "not allowed"),
        (lambda m: _header_swap(m, arrays="x"), "arrays"),
        # shapes whose product wraps to -1 in int64: total -2 once lifted the decompression cap
        (
            lambda m: _header_swap(
                m,
                arrays=[["frames", "|u1", [1722007169, 16711935, 641]]] * 2,
                body=lz4.frame.compress(bytes(20_000_000)),
            ),
            "larger than allowed",
        ),
    ],
)
def test_corrupt_chunks_raise_wire_error(mutate, error):
    message = encode_chunk(synthetic_chunk(np.random.default_rng(1), 10), "run-a")
    with pytest.raises(WireError, match=error):
        decode_chunk(mutate(message), "run-a", stack=4, num_actions=5)


def test_out_of_range_values_are_rejected():
    chunk = synthetic_chunk(np.random.default_rng(2), 10)
    bad_action = type(chunk)(**{**chunk.__dict__, "actions": np.full(10, 9, np.uint8)})
    with pytest.raises(WireError, match="action 9"):
        decode_chunk(encode_chunk(bad_action, "r"), "r", stack=4, num_actions=5)
    bad_index = type(chunk)(**{**chunk.__dict__, "obs_index": chunk.obs_index + 100})
    with pytest.raises(WireError, match="obs_index"):
        decode_chunk(encode_chunk(bad_index, "r"), "r", stack=4, num_actions=5)


def test_random_bytes_and_bit_flips_never_escape_as_other_errors():
    rng = np.random.default_rng(3)
    message = encode_chunk(synthetic_chunk(rng, 20), "run-a")
    accepted = 0
    for trial in range(2000):
        if trial % 2:
            data = rng.integers(0, 256, rng.integers(0, 400), dtype=np.uint8).tobytes()
        else:
            corrupt = bytearray(message)
            for position in rng.integers(0, len(corrupt), rng.integers(1, 8)):
                corrupt[position] ^= 1 << int(rng.integers(8))
            data = bytes(corrupt)
        try:
            decode_chunk(data, "run-a", stack=4, num_actions=5)
            accepted += 1
        except WireError:
            pass
    assert accepted == 0  # the CRC-32 catches every flipped bit, even in a pixel


_BOMB_PROBE = """
import resource, sys
from common.wire import WireError, decode_chunk
message = open(sys.argv[1], "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    decode_chunk(message, "run-a", stack=4, num_actions=5)
    print("decoded")
except WireError as error:
    print("rejected:", error)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(before, after)  # peak RSS in KiB
"""


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux only")
def test_a_decompression_bomb_costs_no_more_memory_than_its_header_promises(tmp_path):
    # 1 GiB of zeros in a ~4 MB lz4 frame, behind a valid header (a real 10-transition chunk's)
    # and a valid CRC: the decoder stops after the promised size + 1 bytes, so the peak RSS of
    # the decoding process grows by about the promised size, not by the 1 GiB.
    message = encode_chunk(synthetic_chunk(np.random.default_rng(1), 10), "run-a")
    compressor = lz4.frame.LZ4FrameCompressor()
    zeros = bytes(16 * 2**20)
    body = compressor.begin() + b"".join(compressor.compress(zeros) for _ in range(64))
    body += compressor.flush()
    path = tmp_path / "bomb.bin"
    path.write_bytes(_header_swap(message, body=body))
    root = pathlib.Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", _BOMB_PROBE, str(path)], capture_output=True,
                            text=True, timeout=120, cwd=root)  # fmt: skip
    assert result.returncode == 0, result.stderr
    verdict, sizes = result.stdout.splitlines()
    before_kib, after_kib = map(int, sizes.split())
    assert verdict.startswith("rejected: body has more than")
    assert (after_kib - before_kib) * 1024 < 64 * 2**20, (before_kib, after_kib)
