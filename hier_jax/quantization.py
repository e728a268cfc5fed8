"""Edge -> cloud transport: k-bit quantization and bit packing of feature maps.

Scheme: a uniform k-bit affine quantizer with per-batch min/max. For a feature
tensor ``x`` the zero point is ``offset = min(x)`` and the step is
``scale = (max(x) - min(x)) / (2**k - 1)``; codes are
``clip(round((x - offset) / scale), 0, 2**k - 1)`` and dequantization is
``codes * scale + offset`` (error <= scale / 2). Codes are then bit-packed,
little-endian: code ``i`` occupies bits ``[i*k, (i+1)*k)`` of the packed stream,
least significant bit first, so at 4 bits codes [1, 2, 3, 4] -> bytes
[0x21, 0x43].

The quantizer is non-differentiable by design. In hierarchical training no
gradient may ever cross from the cloud back to the edge, so ``encode`` puts the
features behind ``jax.lax.stop_gradient``: no straight-through estimator is
needed, and the cut holds even at 16/32 bits where nothing is rounded.

16 bits means "no quantization", just a half-width cast to bfloat16 (chosen over
float16 for its float32 exponent range, so activations cannot overflow);
32 bits sends float32 as is.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import struct

VALID_BITS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 16, 32)


def check_bits(bits: object) -> int:
    """Return ``bits`` as int, or raise ValueError listing the valid values."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or int(bits) not in VALID_BITS:
        raise ValueError(f"bits must be one of {VALID_BITS}, got {bits!r}")
    return int(bits)


def _check_code_bits(bits: object) -> int:
    """Like check_bits, but only the quantized widths 1..8 (codes fit a uint8)."""
    b = check_bits(bits)
    if b > 8:
        raise ValueError(f"quantization/packing needs bits in 1..8 of {VALID_BITS}, got {b}")
    return b


def label_dtype(num_classes: int) -> jnp.dtype:
    """Smallest label dtype used on the wire: uint8 up to 256 classes, else int32."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return jnp.dtype(jnp.uint8) if num_classes <= 256 else jnp.dtype(jnp.int32)


def quantize(x: jax.Array, bits: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Uniform affine quantization with per-tensor min/max -> (uint8 codes, scale, offset)."""
    bits = _check_code_bits(bits)
    x = jnp.asarray(x, jnp.float32)
    lo, hi = jnp.min(x), jnp.max(x)
    levels = 2**bits - 1
    # Constant map: any positive scale gives codes 0 and exact reconstruction.
    scale = jnp.where(hi > lo, (hi - lo) / levels, jnp.float32(1.0)).astype(jnp.float32)
    codes = jnp.clip(jnp.round((x - lo) / scale), 0, levels).astype(jnp.uint8)
    return codes, scale, lo.astype(jnp.float32)


def dequantize(codes: jax.Array, scale: jax.Array, offset: jax.Array) -> jax.Array:
    """Inverse of quantize up to half a step: codes * scale + offset (float32)."""
    return codes.astype(jnp.float32) * scale + offset


def _pack_generic(flat: jax.Array, bits: int) -> jax.Array:
    """Any width: expand to bits (LSB first), then packbits little-endian."""
    bit_planes = (flat[:, None] >> jnp.arange(bits, dtype=jnp.uint8)) & 1
    return jnp.packbits(bit_planes.reshape(-1).astype(jnp.uint8), bitorder="little")


def pack_bits(codes: jax.Array, bits: int) -> jax.Array:
    """Pack the flattened codes into uint8[ceil(n * bits / 8)], little-endian (see module doc).

    Codes are masked to ``bits`` bits so an out-of-range code cannot corrupt its neighbours.
    """
    bits = _check_code_bits(bits)
    flat = jnp.ravel(codes).astype(jnp.uint8) & jnp.uint8(2**bits - 1)
    if bits == 8:
        return flat
    if 8 % bits:
        return _pack_generic(flat, bits)
    per = 8 // bits  # codes per byte; fast path, no bit expansion
    flat = jnp.pad(flat, (0, -flat.size % per)).reshape(-1, per).astype(jnp.uint32)
    shifts = jnp.arange(per, dtype=jnp.uint32) * bits
    return jnp.sum(flat << shifts, axis=1).astype(jnp.uint8)  # disjoint bits: sum == or


def unpack_bits(packed: jax.Array, bits: int, n: int) -> jax.Array:
    """Inverse of pack_bits: the first ``n`` codes as uint8[n]."""
    bits = _check_code_bits(bits)
    packed = jnp.ravel(packed).astype(jnp.uint8)
    if bits == 8:
        return packed[:n]
    if 8 % bits:
        planes = jnp.unpackbits(packed, bitorder="little")[: n * bits].reshape(n, bits)
        weights = jnp.left_shift(jnp.uint8(1), jnp.arange(bits, dtype=jnp.uint8))
        return jnp.sum(planes * weights, axis=1, dtype=jnp.uint8)
    per = 8 // bits
    shifts = jnp.arange(per, dtype=jnp.uint8) * bits
    codes = (packed[:, None] >> shifts) & jnp.uint8(2**bits - 1)
    return codes.reshape(-1)[:n]


@struct.dataclass
class Payload:
    """What the edge sends to the cloud. A pytree: jit- and device_put-friendly.

    data:   bits<=8: uint8 packed codes; 16: bfloat16 features; 32: float32 features.
    scale, offset: float32[] for bits<=8; float32[0] (empty, zero bytes) for 16/32.
    labels: uint8[B] if num_classes <= 256 else int32[B].
    """

    data: jax.Array
    scale: jax.Array
    offset: jax.Array
    labels: jax.Array
    shape: tuple[int, ...] = struct.field(pytree_node=False)
    bits: int = struct.field(pytree_node=False)

    @property
    def nbytes(self) -> int:
        """Bytes on the wire, counted from the arrays themselves (works on tracers too)."""
        arrays = (self.data, self.scale, self.offset, self.labels)
        return sum(int(a.size) * jnp.dtype(a.dtype).itemsize for a in arrays)


def encode(features: jax.Array, labels: jax.Array, bits: int, num_classes: int) -> Payload:
    """Cut the gradient, then quantize+pack (bits<=8), cast to bfloat16 (16) or keep float32 (32).

    Features of any float dtype are taken as float32 first (exact from bfloat16), so the payload's
    dtypes, bytes and error bound do not depend on the precision policy the edge computes in."""
    bits = check_bits(bits)
    features = jax.lax.stop_gradient(jnp.asarray(features, jnp.float32))
    labels = jnp.asarray(labels).astype(label_dtype(num_classes))
    shape = tuple(int(d) for d in features.shape)
    if bits <= 8:
        codes, scale, offset = quantize(features, bits)
        data = pack_bits(codes, bits)
    else:
        data = features.astype(jnp.bfloat16 if bits == 16 else jnp.float32)
        scale = offset = jnp.zeros((0,), jnp.float32)
    return Payload(data=data, scale=scale, offset=offset, labels=labels, shape=shape, bits=bits)


def decode(payload: Payload) -> tuple[jax.Array, jax.Array]:
    """Cloud side: float32 features of payload.shape and int32 labels."""
    labels = payload.labels.astype(jnp.int32)
    if payload.bits <= 8:
        n = math.prod(payload.shape)
        codes = unpack_bits(payload.data, payload.bits, n).reshape(payload.shape)
        return dequantize(codes, payload.scale, payload.offset), labels
    return payload.data.astype(jnp.float32).reshape(payload.shape), labels


def raw_image_nbytes(batch: int, height: int, width: int, channels: int, num_classes: int) -> int:
    """Bytes to send the same batch raw: uint8 pixels plus labels (same label dtype rule)."""
    return batch * height * width * channels + batch * label_dtype(num_classes).itemsize


def payload_nbytes(feature_shape: Sequence[int], batch: int, bits: int, num_classes: int) -> int:
    """Bytes of the real encoded payload of one batch, from shapes alone (jax.eval_shape)."""
    features = jax.ShapeDtypeStruct((batch, *feature_shape), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    return jax.eval_shape(lambda f, y: encode(f, y, bits, num_classes), features, labels).nbytes


def split_bytes(
    feature_shape: tuple[int, ...], batch: int, bits: Sequence[int], num_classes: int
) -> tuple[dict[int, int], int, int]:
    """Link bytes of one batch cut at `feature_shape`: ({bits: hierarchical payload}, split learning's
    float32 features + labels up, its float32 boundary gradient down)."""
    payload = {b: payload_nbytes(feature_shape, batch, b, num_classes) for b in bits}
    activation = payload_nbytes(feature_shape, batch, 32, num_classes)
    return payload, activation, 4 * batch * math.prod(feature_shape)
