"""The payload on a real wire: the packed arrays' own bytes behind a small explicit header, and
nothing else (no pickle: a peer can only ever send numbers and bytes, never code).

A message is the header (little-endian, `HEADER`), then the labels' bytes, then the data's:

    magic b"HJ", format version u16, edge u32, step u64, bits u8, label dtype u8 (1: uint8, 4: int32),
    rank u8, the feature shape (rank x u32), scale f32, zero point f32 (NaN for 16 and 32 bits,
    which have neither), the labels' count u32, the data's bytes u64

Every field is checked against the others before any array is built: the data's length must be
what `bits` packs the shape into, the labels one per example. A message of another format version,
over the run's size limit (`max_message_bytes`, from the largest payload the run can produce) or
inconsistent is refused with `WireError`, one line naming the values.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

import ml_dtypes
import numpy as np

from hier_jax.errors import UserError
from hier_jax.quantization import Payload, check_bits, label_dtype

MAGIC = b"HJ"
VERSION = 1
_FIXED = struct.Struct("<2sHIQBBB")  # magic, version, edge, step, bits, label itemsize, rank
_TAIL = struct.Struct("<ffIQ")  # scale, zero point, labels, data bytes
MAX_RANK = 8
HEADER_MAX = _FIXED.size + 4 * MAX_RANK + _TAIL.size
_LABEL_DTYPES = {1: np.uint8, 4: np.int32}


class WireError(UserError):
    """A message this side cannot take: another format version, over the size limit, or inconsistent."""


def header_nbytes(rank: int) -> int:
    """Bytes of the header of a payload whose features have `rank` dimensions."""
    return _FIXED.size + 4 * rank + _TAIL.size


def data_nbytes(shape: Sequence[int], bits: int) -> int:
    """Bytes `bits` packs a feature map of `shape` into (bfloat16 at 16 bits, float32 at 32)."""
    n = math.prod(shape)
    return n * bits // 8 if bits >= 16 else -(-n * bits // 8)


def max_message_bytes(feature_shape: Sequence[int], batch: int, bits: int, num_classes: int) -> int:
    """The largest message a run sends: a full batch's payload and its header (the gRPC size limit)."""
    shape = (batch, *feature_shape)
    labels = batch * np.dtype(label_dtype(num_classes)).itemsize
    return header_nbytes(len(shape)) + labels + data_nbytes(shape, bits)


def pack(edge: int, step: int, payload: Payload) -> bytes:
    """The message carrying `payload` of `edge`'s step `step`."""
    data, labels = np.asarray(payload.data), np.asarray(payload.labels)
    if payload.bits <= 8:
        scale, offset = float(np.asarray(payload.scale)), float(np.asarray(payload.offset))
    else:
        scale = offset = math.nan
    shape = tuple(payload.shape)
    if len(shape) > MAX_RANK:
        raise WireError(f"a payload of rank {len(shape)} cannot be sent; at most {MAX_RANK}")
    head = _FIXED.pack(MAGIC, VERSION, edge, step, payload.bits, labels.dtype.itemsize, len(shape))
    head += struct.pack(f"<{len(shape)}I", *shape)
    head += _TAIL.pack(scale, offset, labels.size, data.nbytes)
    return head + labels.tobytes() + data.tobytes()


def unpack(message: bytes, *, limit: int) -> tuple[int, int, Payload]:
    """(edge, step, payload) of a message, its arrays in host memory; `WireError` if it is refused."""
    if len(message) > limit:
        raise WireError(f"a message of {len(message):,} bytes is over this run's limit of {limit:,} bytes")
    if len(message) < _FIXED.size:
        raise WireError(f"a message of {len(message)} bytes is shorter than any header ({_FIXED.size})")
    magic, version, edge, step, bits, label_size, rank = _FIXED.unpack_from(message)
    if magic != MAGIC:
        raise WireError(f"not a hier-jax message (it starts {magic!r}, not {MAGIC!r})")
    if version != VERSION:
        raise WireError(f"a message of wire format {version}; this side speaks format {VERSION}")
    if rank > MAX_RANK or len(message) < header_nbytes(rank):
        raise WireError(f"a header of rank {rank} in a message of {len(message)} bytes")
    shape = struct.unpack_from(f"<{rank}I", message, _FIXED.size)
    scale, offset, n_labels, n_data = _TAIL.unpack_from(message, _FIXED.size + 4 * rank)
    try:
        check_bits(bits)
    except ValueError as error:
        raise WireError(f"a message with bits {bits}: {error}") from None
    if label_size not in _LABEL_DTYPES:
        raise WireError(f"labels of {label_size} bytes each; valid: 1 (uint8), 4 (int32)")
    start = header_nbytes(rank)
    expected = (n_labels == (shape[0] if rank else 0), n_data == data_nbytes(shape, bits))
    if not all(expected) or len(message) != start + n_labels * label_size + n_data:
        raise WireError(
            f"an inconsistent message: shape {tuple(shape)} at {bits} bits holds {data_nbytes(shape, bits)} "
            f"data bytes and {shape[0] if rank else 0} labels; it says {n_data} and {n_labels} in "
            f"{len(message)} bytes"
        )
    labels = np.frombuffer(message, _LABEL_DTYPES[label_size], n_labels, start)
    body = start + labels.nbytes
    if bits <= 8:
        data = np.frombuffer(message, np.uint8, n_data, body)
        scale_a, offset_a = np.float32(scale), np.float32(offset)
    else:
        dtype = np.dtype(ml_dtypes.bfloat16) if bits == 16 else np.dtype(np.float32)
        data = np.frombuffer(message, dtype, n_data // dtype.itemsize, body).reshape(shape)
        scale_a = offset_a = np.zeros((0,), np.float32)
    host: dict[str, Any] = {"data": data, "scale": scale_a, "offset": offset_a, "labels": labels}  # numpy
    payload = Payload(**host, shape=tuple(shape), bits=bits)
    return edge, step, payload
