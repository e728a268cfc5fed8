"""The two flop conventions: XLA's count of a convolution against the hand-derived count of its taps on
the input, the conventional count of the whole window, and a module's padding flops through every
convolution formulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from hier_jax.models import layers, xla_cpu
from hier_jax.runtime_model import flops
from hier_jax.runtime_model.profile import Timing

DN = ("NHWC", "HWIO", "NHWC")


def xla_count(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def lone_conv_eqn(x, w, **kw):
    jaxpr = jax.make_jaxpr(lambda x, w: lax.conv_general_dilated(x, w, dimension_numbers=DN, **kw))(x, w)
    (eqn,) = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    return eqn


@pytest.mark.parametrize(
    "size, out, k, stride, pad, taps",
    [
        (2, 2, 3, 1, 1, 4),  # 2 outputs x 3 taps, the first and last on padding
        (32, 32, 3, 1, 1, 94),  # 96 pairs, two on padding
        (8, 4, 3, 2, 0, 11),  # SAME, stride 2 pads 0 before: the last output's third tap (at 8) is padding
        (1, 1, 3, 1, 1, 1),  # a 1x1 map: only the centre tap
        (5, 5, 1, 1, 0, 5),  # 1x1 kernels never touch padding
    ],
)
def test_window_taps_by_hand(size, out, k, stride, pad, taps):
    assert flops.window_taps(size, out, k, stride, pad) == taps


@pytest.mark.parametrize(
    "h, k, strides, padding, rhs_dilation, groups",
    [
        (2, 3, (1, 1), "SAME", (1, 1), 1),
        (4, 3, (1, 1), "SAME", (1, 1), 1),
        (8, 3, (2, 2), "SAME", (1, 1), 1),
        (9, 3, (2, 2), ((1, 0), (2, 1)), (1, 1), 1),
        (8, 3, (1, 1), "SAME", (2, 2), 1),
        (6, 5, (1, 1), "VALID", (1, 1), 1),
        (8, 3, (1, 1), "SAME", (1, 1), 2),
    ],
)
def test_conv_flops_match_xla_and_the_conventional_formula(h, k, strides, padding, rhs_dilation, groups):
    n, ci, co = 2, 4, 6
    x = jnp.ones((n, h, h + 1, ci))
    w = jnp.ones((k, k, ci // groups, co))
    kw = dict(
        window_strides=strides, padding=padding, rhs_dilation=rhs_dilation, feature_group_count=groups
    )  # fmt: skip
    eqn = lone_conv_eqn(x, w, **kw)
    xla, conventional = flops.conv_flops(eqn)
    assert xla == xla_count(lambda x, w: lax.conv_general_dilated(x, w, dimension_numbers=DN, **kw), x, w)
    _, ho, wo, _ = eqn.outvars[0].aval.shape
    assert conventional == 2 * n * ho * wo * co * k * k * ci / groups
    assert xla <= conventional


def test_a_3x3_conv_on_a_2x2_map_counts_four_of_nine_taps():
    x, w = jnp.ones((1, 2, 2, 8)), jnp.ones((3, 3, 8, 8))
    xla, conventional = flops.conv_flops(lone_conv_eqn(x, w, window_strides=(1, 1), padding="SAME"))
    assert xla / conventional == pytest.approx(4 / 9)


def test_gradient_convolutions_count_the_forward_taps_under_xla():
    """What `flops.conventional`'s passes rest on: XLA counts each gradient convolution's taps as the
    forward's, so a train step's padding share is the forward's times the passes."""
    x, w = jnp.ones((2, 4, 4, 8)), jnp.ones((3, 3, 8, 16))

    def conv(x, w):
        return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)

    fwd = xla_count(conv, x, w)
    both = xla_count(lambda x, w: jax.grad(lambda x, w: jnp.sum(conv(x, w)), argnums=(0, 1))(x, w), x, w)
    assert both == pytest.approx(2 * fwd)  # the sum's gradient needs no forward: dx and dw only
    xla, _ = flops.conv_flops(lone_conv_eqn(x, w, window_strides=(1, 1), padding="SAME"))
    assert fwd == xla


@pytest.mark.parametrize("impl", ["xla", "cpu"])
@pytest.mark.parametrize("h", [2, 8])
def test_module_padding_flops_by_hand_under_every_formulation(impl, h):
    """A conv-BN-ReLU block, 3x3 SAME conv of 8 -> 16 channels on an hxh map, batch 3: per dimension 3h
    pairs, 3h - 2 on the input; the CPU formulation's dense product on 2x2 maps would hide them, the lax
    twin does not."""
    with xla_cpu.conv_impl(impl):
        block = layers.ConvBNReLU(8, 16, bias=False, rngs=nnx.Rngs(0))
    padding = flops.module_padding_flops(block, jax.ShapeDtypeStruct((3, h, h, 8), jnp.float32))
    assert padding == 2 * 3 * 16 * 8 * ((3 * h) ** 2 - (3 * h - 2) ** 2)
    assert block.conv.conv_general_dilated == xla_cpu.Conv(xla_cpu.resolve_impl(impl))  # the module untouched


def test_conventional_adds_the_padding_once_per_pass():
    assert flops.conventional(100.0, 10.0, 3) == 130.0
    with pytest.raises(ValueError):
        flops.conventional(100.0, -1.0, 1)


def test_timing_counted_by_convention():
    t = Timing(1.0, 3.0, 10.0, 30.0, 12.0, 36.0)
    assert t.counted("xla") == (10.0, 30.0)
    assert t.counted("conventional") == (12.0, 36.0)
    with pytest.raises(ValueError, match="valid: conventional, xla"):
        t.counted("torch")
    with pytest.raises(ValueError, match="profile the model again"):
        Timing(1.0, 3.0, 10.0, 30.0).counted("conventional")


def test_padding_flops_finds_nested_convolutions():
    x, w = jnp.ones((1, 2, 2, 4)), jnp.ones((3, 3, 4, 4))

    def conv(x, w):
        return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)

    inner = flops.padding_flops(conv, x, w)
    assert inner == 2 * 4 * 4 * (36 - 16)
    assert flops.padding_flops(jax.jit(lambda x, w: conv(conv(x, w), w)), x, w) == 2 * inner
    assert np.isclose(flops.padding_flops(jax.checkpoint(conv), x, w), inner)
