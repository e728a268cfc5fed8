"""The payload's wire format: real encoded payloads round-trip bit for bit, the header's bytes are the
hand-counted ones, and every message this side cannot take is refused with one line."""

import struct

import jax.numpy as jnp
import numpy as np
import pytest

from hier_jax import quantization
from hier_jax.link import wire


def real_payload(bits: int, num_classes: int = 10, shape=(4, 3, 5, 7)):
    rng = np.random.default_rng(bits)
    features = jnp.asarray(rng.normal(size=shape), jnp.float32)
    labels = jnp.asarray(rng.integers(0, num_classes, size=shape[0]))
    return quantization.encode(features, labels, bits, num_classes)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8, 16, 32])
def test_a_real_payload_round_trips_bit_for_bit_and_decodes_to_the_same_features(bits):
    payload = real_payload(bits)
    message = wire.pack(2, 41, payload)
    limit = wire.max_message_bytes((3, 5, 7), batch=4, bits=bits, num_classes=10)
    assert len(message) == limit  # a full batch is exactly the largest message
    edge, step, back = wire.unpack(message, limit=limit)
    assert (edge, step, back.bits, back.shape) == (2, 41, bits, payload.shape)
    for name in ("data", "scale", "offset", "labels"):
        sent, got = np.asarray(getattr(payload, name)), np.asarray(getattr(back, name))
        assert sent.dtype == got.dtype and sent.shape == got.shape and sent.tobytes() == got.tobytes(), name
    for a, b in zip(quantization.decode(payload), quantization.decode(back), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_message_is_the_payloads_own_bytes_and_a_hand_counted_header():
    """4 bits, 4x3x5x7 = 420 codes: 210 data bytes, 4 uint8 labels; the header is magic 2 + version 2
    + edge 4 + step 8 + bits, label size, rank 3 + shape 4x4 + scale 4 + zero point 4 + labels 4 +
    data bytes 8 = 55."""
    payload = real_payload(4)
    assert payload.nbytes == 210 + 4 + 4 + 4  # the payload counts its scale and zero point as arrays
    assert wire.header_nbytes(4) == 55
    message = wire.pack(0, 0, payload)
    assert len(message) == 55 + 4 + 210
    assert message[:2] == b"HJ" and struct.unpack_from("<H", message, 2)[0] == wire.VERSION
    with_int32_labels = real_payload(8, num_classes=1000)
    assert len(wire.pack(0, 0, with_int32_labels)) == 55 + 4 * 4 + 420


def test_another_wire_version_is_refused_naming_both():
    message = bytearray(wire.pack(0, 0, real_payload(4)))
    struct.pack_into("<H", message, 2, wire.VERSION + 1)
    with pytest.raises(wire.WireError, match=f"wire format {wire.VERSION + 1}; this side speaks format {wire.VERSION}"):
        wire.unpack(bytes(message), limit=10**6)


def test_an_oversize_message_is_refused_naming_its_size_and_the_limit():
    message = wire.pack(0, 0, real_payload(32))
    with pytest.raises(wire.WireError, match=f"{len(message):,} bytes is over this run's limit of 100 bytes"):
        wire.unpack(message, limit=100)


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda m: b"XX" + m[2:], "not a hier-jax message"),
        (lambda m: m[:-1], "inconsistent message"),
        (lambda m: m + b"\0", "inconsistent message"),
        (lambda m: m[:10], "shorter than any header"),
        (lambda m: m[:16] + bytes([9]) + m[17:], "bits 9"),
    ],
    ids=["magic", "truncated", "trailing", "short", "bits"],
)
def test_a_damaged_message_is_refused_before_any_array_is_built(damage, words):
    with pytest.raises(wire.WireError, match=words):
        wire.unpack(damage(wire.pack(0, 0, real_payload(4))), limit=10**6)


def test_the_refusal_is_one_line():
    with pytest.raises(wire.WireError) as refused:
        wire.unpack(b"HJ" + bytes(30), limit=10)
    assert "\n" not in str(refused.value)
