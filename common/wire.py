"""Wire format for everything that crosses Redis.

Chunks and weights: a msgpack header + raw little-endian arrays, lz4. A message is
`MAGIC | u32 header length | u32 CRC-32 | msgpack header | lz4 frame of the array bytes`, the
CRC-32 covering the header and the lz4 frame. Decoding checks the CRC first (a flipped bit
anywhere is rejected, not decoded into wrong pixels), then every header field against what is
allowed, then decompresses at most the byte count the header promises (a decompression bomb
stops there), all before a single array is built: a corrupt or hostile message raises a
WireError and never reaches pickle (nothing here unpickles).

Records (episode telemetry, role stats): a msgpack map of names to numbers, strings or booleans,
checked on decoding the same way.
"""

from __future__ import annotations

import math
import struct
import zlib

import lz4.frame
import msgpack
import numpy as np
import torch

from common.experience import Chunk, ChunkError

MAGIC = b"MRO2"  # MRO1: the same without the CRC
SCHEMA_VERSION = 1
_LENGTH = struct.Struct("<I")
_MAX_HEADER_BYTES = 64 * 1024
_MAX_BODY_BYTES = 512 * 1024 * 1024
_CHUNK_ARRAYS = {
    # name: (dtype, number of dimensions)
    "frames": ("|u1", 3),
    "obs_index": ("<u2", 2),
    "next_index": ("<u2", 2),
    "actions": ("|u1", 1),
    "returns": ("<f4", 1),
    "discounts": ("<f4", 1),
    "priorities": ("<f4", 1),
}
_WEIGHT_DTYPES = {"<f4": torch.float32, "<f2": torch.float16, "<i8": torch.int64}
_BF16 = "bf16"


class WireError(ValueError):
    """A message that cannot be decoded; the message says which field is wrong."""


def _pack(kind: str, meta: dict, arrays: list[tuple[str, str, tuple[int, ...], bytes]]) -> bytes:
    header = {
        "schema": SCHEMA_VERSION,
        "kind": kind,
        **meta,
        "arrays": [[name, dtype, list(shape)] for name, dtype, shape, _ in arrays],
    }
    header_bytes = msgpack.packb(header, use_bin_type=True)
    body = lz4.frame.compress(b"".join(data for *_, data in arrays))
    checksum = zlib.crc32(body, zlib.crc32(header_bytes))
    return MAGIC + _LENGTH.pack(len(header_bytes)) + _LENGTH.pack(checksum) + header_bytes + body


def _unpack(message: bytes, kind: str) -> tuple[dict, list[tuple[str, str, tuple, memoryview]]]:
    if not isinstance(message, bytes | bytearray | memoryview):
        raise WireError(f"message must be bytes, got {type(message).__name__}")
    message = bytes(message)
    start = len(MAGIC) + 2 * _LENGTH.size
    if len(message) < start or not message.startswith(MAGIC):
        raise WireError("bad magic: not a mario wire message")
    header_length, checksum = struct.unpack_from("<II", message, len(MAGIC))
    if header_length > _MAX_HEADER_BYTES or start + header_length > len(message):
        raise WireError(f"header length {header_length} is out of range")
    if zlib.crc32(message[start:]) != checksum:
        raise WireError("checksum mismatch: the message was corrupted")
    try:
        header = msgpack.unpackb(
            message[start : start + header_length], raw=False, strict_map_key=True
        )
    except Exception as error:  # msgpack raises several exception types on garbage
        raise WireError(f"header is not valid msgpack: {error}") from error
    if not isinstance(header, dict):
        raise WireError("header is not a map")
    if header.get("schema") != SCHEMA_VERSION:
        raise WireError(f"schema {header.get('schema')!r} is not {SCHEMA_VERSION}")
    if header.get("kind") != kind:
        raise WireError(f"kind {header.get('kind')!r} is not {kind!r}")
    specs = header.get("arrays")
    if not isinstance(specs, list):
        raise WireError("header.arrays is not a list")
    parsed, total = [], 0
    for spec in specs:
        if (
            not isinstance(spec, list)
            or len(spec) != 3
            or not isinstance(spec[0], str)
            or not isinstance(spec[1], str)
            or not isinstance(spec[2], list)
            or not all(isinstance(d, int) and 0 <= d < 2**31 for d in spec[2])
        ):
            raise WireError(f"bad array spec {spec!r}")
        name, dtype, shape = spec[0], spec[1], tuple(spec[2])
        itemsize = 2 if dtype == _BF16 else _itemsize(dtype)
        size = itemsize * math.prod(shape)  # Python ints: a crafted shape cannot wrap around
        total += size
        if total > _MAX_BODY_BYTES:
            raise WireError(f"arrays are larger than allowed ({total} > {_MAX_BODY_BYTES} bytes)")
        parsed.append((name, dtype, shape, size))
    body = _decompress(message[start + header_length :], total)
    view, offset, out = memoryview(body), 0, []
    for name, dtype, shape, size in parsed:
        out.append((name, dtype, shape, view[offset : offset + size]))
        offset += size
    return header, out


def _decompress(frame: bytes, size: int) -> bytes:
    """The lz4 frame's content, which must be exactly `size` bytes: decompression stops after
    size + 1 bytes, so a frame that inflates beyond what the header promises costs no more."""
    decompressor = lz4.frame.LZ4FrameDecompressor()
    try:
        body = decompressor.decompress(frame, max_length=size + 1)
    except Exception as error:  # lz4 raises RuntimeError on a corrupt frame
        raise WireError(f"body is not a valid lz4 frame: {error}") from error
    if len(body) != size or not decompressor.eof or decompressor.unused_data:
        shown = f"more than {size}" if len(body) > size else str(len(body))
        raise WireError(f"body has {shown} bytes or trailing data, header promises {size}")
    return body


def _itemsize(dtype: str) -> int:
    allowed = {"|u1": 1, "<u2": 2, "<f4": 4, "<f2": 2, "<i8": 8}
    if dtype not in allowed:
        raise WireError(f"dtype {dtype!r} is not allowed")
    return allowed[dtype]


def _int_field(header: dict, name: str, low: int = 0, high: int = 2**62) -> int:
    value = header.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise WireError(f"header.{name} {value!r} is not an integer in [{low}, {high}]")
    return value


# -- experience chunks -------------------------------------------------------------------------


def encode_chunk(chunk: Chunk, run_id: str) -> bytes:
    """Serializes a chunk for XADD."""
    arrays = []
    for name, (dtype, _) in _CHUNK_ARRAYS.items():
        array = np.ascontiguousarray(getattr(chunk, name), dtype=np.dtype(dtype))
        arrays.append((name, dtype, array.shape, array.tobytes()))
    meta = {
        "run_id": run_id,
        "actor_id": int(chunk.actor_id),
        "env_slot": int(chunk.env_slot),
        "policy_version": int(chunk.policy_version),
        "count": len(chunk),
        "frame_count": len(chunk.frames),
        "stack": int(chunk.obs_index.shape[1]),
    }
    return _pack("chunk", meta, arrays)


def decode_chunk(message: bytes, run_id: str, stack: int, num_actions: int) -> Chunk:
    """Parses and validates a chunk message.

    Raises:
        WireError: for anything malformed, from another run, or inconsistent.
    """
    header, arrays = _unpack(message, "chunk")
    if header.get("run_id") != run_id:
        raise WireError(f"run_id {header.get('run_id')!r} is not this run's {run_id!r}")
    count = _int_field(header, "count", 1, 100_000)
    frame_count = _int_field(header, "frame_count", 1, 200_000)
    if _int_field(header, "stack", 1, 64) != stack:
        raise WireError(f"stack {header['stack']} is not {stack}")
    fields = {}
    for name, dtype, shape, data in arrays:
        if name not in _CHUNK_ARRAYS or name in fields:
            raise WireError(f"unexpected array {name!r}")
        expected_dtype, ndim = _CHUNK_ARRAYS[name]
        if dtype != expected_dtype or len(shape) != ndim:
            raise WireError(f"array {name!r} is {dtype}{list(shape)}, expected {expected_dtype}")
        fields[name] = np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape)
    missing = set(_CHUNK_ARRAYS) - set(fields)
    if missing:
        raise WireError(f"missing arrays {sorted(missing)}")
    if fields["frames"].shape[0] != frame_count or fields["actions"].shape[0] != count:
        raise WireError("header counts disagree with the array shapes")
    chunk = Chunk(
        **fields,
        actor_id=_int_field(header, "actor_id", 0, 2**31),
        env_slot=_int_field(header, "env_slot", 0, 2**31),
        policy_version=_int_field(header, "policy_version"),
    )
    try:
        chunk.validate(num_actions=num_actions)
    except ChunkError as error:
        raise WireError(str(error)) from error
    return chunk


# -- weights -----------------------------------------------------------------------------------


def encode_weights(state_dict: dict[str, torch.Tensor], version: int) -> bytes:
    """A version-tagged blob of raw tensors (no pickle)."""
    arrays = []
    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu().contiguous()
        if tensor.dtype == torch.bfloat16:
            data = tensor.view(torch.int16).numpy().tobytes()
            arrays.append((name, _BF16, tuple(tensor.shape), data))
            continue
        array = tensor.numpy()
        dtype = array.dtype.newbyteorder("<").str
        if dtype not in _WEIGHT_DTYPES:
            raise WireError(f"tensor {name!r} has unsupported dtype {tensor.dtype}")
        arrays.append((name, dtype, array.shape, array.astype(dtype, copy=False).tobytes()))
    return _pack("weights", {"version": int(version)}, arrays)


def decode_weights(
    message: bytes, expected: dict[str, torch.Tensor] | None = None
) -> tuple[dict[str, torch.Tensor], int]:
    """Parses a weights blob; with `expected`, names and shapes must match it exactly.

    Returns:
        (state dict of CPU tensors, version).
    """
    header, arrays = _unpack(message, "weights")
    version = _int_field(header, "version")
    state = {}
    for name, dtype, shape, data in arrays:
        if dtype == _BF16:  # (numpy has no bfloat16: its bits as int16; empty ones too)
            bits = np.frombuffer(data, dtype=np.int16).copy()
            tensor = torch.from_numpy(bits).view(torch.bfloat16)
        else:
            tensor = torch.from_numpy(np.frombuffer(data, dtype=np.dtype(dtype)).copy())
        state[name] = tensor.reshape(shape)
    if expected is not None:
        if set(state) != set(expected):
            raise WireError(f"weights have tensors {sorted(set(state) ^ set(expected))} differing")
        for name, tensor in expected.items():
            if tuple(state[name].shape) != tuple(tensor.shape):
                raise WireError(f"tensor {name!r} has shape {tuple(state[name].shape)}")
    return state, version


# -- records: episode telemetry and role stats ------------------------------------------------

_MAX_RECORD_BYTES = 64 * 1024
_RECORD_VALUE_TYPES = (int, float, str, bool)


def encode_record(record: dict[str, int | float | str | bool]) -> bytes:
    """A flat record (names to scalars) as msgpack."""
    return msgpack.packb(record, use_bin_type=True)


def decode_record(message: bytes) -> dict[str, int | float | str | bool]:
    """Parses a record; raises WireError unless it is a flat map of names to scalars."""
    if not isinstance(message, bytes | bytearray) or len(message) > _MAX_RECORD_BYTES:
        raise WireError("record is not bytes of at most 64 KiB")
    try:
        record = msgpack.unpackb(message, raw=False, strict_map_key=True)
    except Exception as error:  # msgpack raises several exception types on garbage
        raise WireError(f"record is not valid msgpack: {error}") from error
    if not isinstance(record, dict):
        raise WireError("record is not a map")
    for name, value in record.items():
        if not isinstance(name, str):
            raise WireError(f"record field name {name!r} is {type(name).__name__}, not str")
        if not isinstance(value, _RECORD_VALUE_TYPES):
            raise WireError(f"record field {name!r} is {type(value).__name__}, not a scalar")
    return record
