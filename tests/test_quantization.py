"""Tests for hier_jax.quantization: accuracy, exact byte counts, packing layout, gradient cut."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hier_jax import quantization as q

CODE_BITS = range(1, 9)


def _rand(shape, seed=0, loc=0.0, scale=3.0):
    return np.random.default_rng(seed).normal(loc, scale, shape).astype(np.float32)


def _ref_pack(codes, bits):
    """Independent reference: build the little-endian bit stream with Python ints."""
    stream = 0
    for i, c in enumerate(np.ravel(codes).tolist()):
        stream |= int(c) << (i * bits)
    nbytes = math.ceil(len(np.ravel(codes)) * bits / 8)
    return np.frombuffer(stream.to_bytes(nbytes, "little"), np.uint8) if nbytes else np.zeros(0, np.uint8)


@pytest.mark.parametrize("bits", CODE_BITS)
def test_round_trip_within_half_step(bits):
    x = _rand((4, 5, 5, 3), seed=bits, loc=-0.5)
    assert x.min() < 0 < x.max()
    codes, scale, offset = q.quantize(jnp.asarray(x), bits)
    assert codes.dtype == jnp.uint8 and codes.shape == x.shape
    assert int(codes.min()) == 0 and int(codes.max()) == 2**bits - 1  # full range used
    np.testing.assert_allclose(float(offset), x.min(), rtol=0)
    np.testing.assert_allclose(float(scale), (x.max() - x.min()) / (2**bits - 1), rtol=1e-6)
    err = np.abs(np.asarray(q.dequantize(codes, scale, offset)) - x)
    tol = float(scale) / 2 + 4 * np.finfo(np.float32).eps * np.abs(x).max()
    assert err.max() <= tol
    if bits >= 2:  # the error bound is tight: the mean error is about a quarter step
        assert err.mean() > float(scale) / 8


def test_more_bits_means_less_error():
    x = jnp.asarray(_rand((1000,), seed=1))
    errs = [float(jnp.abs(q.dequantize(*q.quantize(x, b)) - x).max()) for b in CODE_BITS]
    assert all(a > b for a, b in zip(errs, errs[1:], strict=False))


@pytest.mark.parametrize("value", [0.0, -3.25, 7.5])
def test_constant_map_exact(value):
    x = jnp.full((2, 3, 3, 4), value, jnp.float32)
    for bits in (1, 4, 8):
        codes, scale, offset = q.quantize(x, bits)
        assert not np.any(np.asarray(codes))
        y = q.dequantize(codes, scale, offset)
        assert np.all(np.isfinite(np.asarray(y)))
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
        feats, _ = q.decode(q.encode(x, jnp.zeros(2, jnp.int32), bits, 10))
        np.testing.assert_array_equal(np.asarray(feats), np.asarray(x))


def test_all_negative_map():
    x = -np.abs(_rand((3, 4, 4, 2), seed=7)) - 1.0
    codes, scale, offset = q.quantize(jnp.asarray(x), 3)
    assert float(offset) < 0
    y = np.asarray(q.dequantize(codes, scale, offset))
    assert y.max() < 0
    assert np.abs(y - x).max() <= float(scale) / 2 * (1 + 1e-5) + 1e-6


@pytest.mark.parametrize("bits", CODE_BITS)
@pytest.mark.parametrize("n", [1, 7, 13, 1000])
def test_pack_size_and_round_trip(bits, n):
    codes = np.random.default_rng(n * 10 + bits).integers(0, 2**bits, n, dtype=np.uint8)
    packed = q.pack_bits(jnp.asarray(codes), bits)
    assert packed.dtype == jnp.uint8 and packed.shape == (math.ceil(n * bits / 8),)
    np.testing.assert_array_equal(np.asarray(packed), _ref_pack(codes, bits))
    np.testing.assert_array_equal(np.asarray(q.unpack_bits(packed, bits, n)), codes)


def test_pack_hand_derived_examples():
    # 4 bits, low nibble first: [1,2,3,4] -> 0x21, 0x43.
    np.testing.assert_array_equal(np.asarray(q.pack_bits(jnp.array([1, 2, 3, 4], jnp.uint8), 4)), [0x21, 0x43])
    # 1 bit, LSB first: [1,0,0,0,0,0,0,1, 1] -> 0x81, 0x01.
    np.testing.assert_array_equal(
        np.asarray(q.pack_bits(jnp.array([1, 0, 0, 0, 0, 0, 0, 1, 1], jnp.uint8), 1)), [0x81, 0x01]
    )
    # 3 bits: 5=101, 3=011, 7=111 -> stream (LSB first) 101 110 111 -> bits 0..8:
    # byte0 = 0b11_011_101 = 0xDD, byte1 = 0b0000000_1 = 0x01.
    np.testing.assert_array_equal(np.asarray(q.pack_bits(jnp.array([5, 3, 7], jnp.uint8), 3)), [0xDD, 0x01])


def test_pack_masks_out_of_range_codes():
    packed = q.pack_bits(jnp.array([0xFF, 0x00], jnp.uint8), 2)
    np.testing.assert_array_equal(np.asarray(packed), [0x03])


def _payload_inputs(bits, num_classes=10, shape=(2, 4, 4, 8)):
    x = jnp.asarray(_rand(shape, seed=bits))
    y = jnp.array([3, num_classes - 1], jnp.int32)
    return x, y


@pytest.mark.parametrize(
    "bits, num_classes, data_bytes, param_bytes, label_bytes",
    [
        (4, 10, 128, 8, 2),  # 256 values * 4 bits = 128 B, float32 scale + offset
        (1, 10, 32, 8, 2),
        (3, 10, 96, 8, 2),
        (8, 256, 256, 8, 2),
        (16, 10, 512, 0, 2),  # bfloat16, no scale/offset
        (32, 10, 1024, 0, 2),
        (4, 1000, 128, 8, 8),  # int32 labels
        (32, 257, 1024, 0, 8),
    ],
)
def test_payload_nbytes(bits, num_classes, data_bytes, param_bytes, label_bytes):
    x, y = _payload_inputs(bits, num_classes)
    p = q.encode(x, y, bits, num_classes)
    assert p.data.nbytes == data_bytes
    assert p.scale.nbytes + p.offset.nbytes == param_bytes
    assert p.labels.nbytes == label_bytes
    assert p.nbytes == data_bytes + param_bytes + label_bytes
    assert p.labels.dtype == (jnp.uint8 if num_classes <= 256 else jnp.int32)
    feats, labels = q.decode(p)
    assert feats.shape == x.shape and feats.dtype == jnp.float32
    assert labels.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(labels), np.asarray(y))


@pytest.mark.parametrize("bits", [1, 4, 8, 16, 32])
def test_bfloat16_features_encode_as_their_float32_values(bits):
    """The edge computes in bfloat16 under --precision bf16: its payload is the one its features'
    float32 values give (same arrays, dtypes and bytes; 32 bits stays float32)."""
    x, y = _payload_inputs(bits)
    x16 = x.astype(jnp.bfloat16)
    got, want = q.encode(x16, y, bits, 10), q.encode(x16.astype(jnp.float32), y, bits, 10)
    assert got.nbytes == want.nbytes == q.encode(x, y, bits, 10).nbytes
    for a, b in zip(
        (got.data, got.scale, got.offset, got.labels), (want.data, want.scale, want.offset, want.labels), strict=False
    ):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert got.data.dtype == {16: jnp.bfloat16, 32: jnp.float32}.get(bits, jnp.uint8)


def test_payload_nbytes_exact_example():
    x, y = _payload_inputs(4)
    assert q.encode(x, y, 4, 10).nbytes == 138
    assert q.encode(x, y, 32, 10).nbytes == 1026
    assert q.encode(x, y, 16, 10).nbytes == 514
    assert q.encode(x, y, 4, 1000).nbytes == 128 + 8 + 8


def test_raw_image_nbytes():
    assert q.raw_image_nbytes(2, 32, 32, 3, 10) == 2 * 3072 + 2
    assert q.raw_image_nbytes(2, 32, 32, 3, 1000) == 2 * 3072 + 8


@pytest.mark.parametrize("bits", [2, 5, 16, 32])
def test_encode_decode_accuracy(bits):
    x, y = _payload_inputs(bits)
    feats, _ = q.decode(q.encode(x, y, bits, 10))
    err = float(jnp.abs(feats - x).max())
    span = float(x.max() - x.min())
    bound = {16: float(jnp.abs(x).max()) * 2**-8, 32: 0.0}.get(bits, span / (2**bits - 1) / 2 * (1 + 1e-5))
    assert err <= bound


@pytest.mark.parametrize("bits", [3, 4, 16, 32])
def test_jit_and_device_put(bits):
    x, y = _payload_inputs(bits)
    enc = jax.jit(q.encode, static_argnames=("bits", "num_classes"))
    dec = jax.jit(q.decode)
    p = enc(x, y, bits=bits, num_classes=10)
    p_eager = q.encode(x, y, bits, 10)
    assert p.nbytes == p_eager.nbytes
    np.testing.assert_array_equal(np.asarray(p.data), np.asarray(p_eager.data))  # same codes
    f_eager, _ = q.decode(p_eager)
    f_jit, l_jit = dec(p)
    # XLA may fuse the scale arithmetic differently from eager mode: allow float rounding only.
    np.testing.assert_allclose(np.asarray(f_jit), np.asarray(f_eager), rtol=1e-5, atol=1e-5)

    dev = jax.devices()[-1]  # the second host device on CPU; the only one on one GPU
    moved = jax.device_put(p, dev)
    assert isinstance(moved, q.Payload) and moved.shape == p.shape and moved.bits == bits
    assert moved.data.devices() == {dev}
    f_dev, l_dev = dec(moved)
    assert f_dev.devices() == {dev}
    np.testing.assert_array_equal(np.asarray(f_dev), np.asarray(f_jit))
    np.testing.assert_array_equal(np.asarray(l_dev), np.asarray(l_jit))


@pytest.mark.parametrize("bits", [4, 32])
def test_no_gradient_reaches_edge(bits):
    x = jnp.asarray(_rand((2, 3, 3, 2), seed=3))
    y = jnp.zeros(2, jnp.int32)

    def through_link(x):
        feats, _ = q.decode(q.encode(jnp.tanh(x) * 2.0, y, bits, 10))
        return jnp.sum(feats * feats)

    g = jax.grad(through_link)(x)
    np.testing.assert_array_equal(np.asarray(g), np.zeros_like(x))
    # Sanity: the same function without the link has a nonzero gradient.
    assert float(jnp.abs(jax.grad(lambda x: jnp.sum((jnp.tanh(x) * 2.0) ** 2))(x)).sum()) > 0


@pytest.mark.parametrize("bad", [0, 9, 12, -1, 64, True, 4.0, "4", None])
def test_bad_bits(bad):
    with pytest.raises(ValueError, match=r"\(1, 2, 3, 4, 5, 6, 7, 8, 16, 32\)"):
        q.check_bits(bad)
    with pytest.raises(ValueError, match="1, 2, 3"):
        q.encode(jnp.zeros((1, 2)), jnp.zeros(1, jnp.int32), bad, 10)


@pytest.mark.parametrize("bits", [16, 32])
def test_quantize_rejects_wide_bits(bits):
    assert q.check_bits(bits) == bits
    with pytest.raises(ValueError, match="1..8"):
        q.quantize(jnp.zeros(3), bits)
    with pytest.raises(ValueError, match="1..8"):
        q.pack_bits(jnp.zeros(3, jnp.uint8), bits)


def test_check_bits_accepts_numpy_int():
    assert q.check_bits(np.int64(5)) == 5
