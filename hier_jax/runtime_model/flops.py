"""Two conventions for a convolution's flops, and the difference between them for a module.

XLA's cost analysis (what `Timing.fwd_flops` and `train_flops` hold) counts only the multiply-adds
whose kernel tap lands on the input, leaving out those on the zero padding: a 3x3 "SAME" convolution
on a 2x2 map counts 4 of its 9 taps per output. The conventional count (PyTorch's FlopCounterMode,
fvcore, the papers' MAC figures) takes the whole window at every output, 2 N Ho Wo Co kh kw Ci / groups,
and so does the hardware that lowers convolutions to im2col products or to most cuDNN algorithms. The
throughput the paper's devices are calibrated with (ResNet-50's 3.8 G multiply-adds per image) is in
the conventional count. Autodiff's weight- and input-gradient convolutions count the same taps as the
forward one under XLA's analysis (tested), so a train step's padding share is the forward's times the
number of convolution passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.extend import core as jex_core

from hier_jax import steps
from hier_jax.models import xla_cpu


def window_taps(size: int, out: int, k: int, stride: int, pad_lo: int, lhs_dil: int = 1, rhs_dil: int = 1) -> int:
    """(output, tap) pairs of one spatial dimension whose tap lands on an input element (not on padding
    or between dilated inputs): what XLA counts; the conventional count is `out * k`."""
    pos = np.arange(out)[:, None] * stride + np.arange(k)[None, :] * rhs_dil - pad_lo
    on_input = (pos >= 0) & (pos <= (size - 1) * lhs_dil) & (pos % lhs_dil == 0)
    return int(on_input.sum())


def conv_flops(eqn: Any) -> tuple[float, float]:
    """(XLA's count, the conventional count) of one conv_general_dilated equation of a jaxpr."""
    p = eqn.params
    lhs, rhs = (v.aval.shape for v in eqn.invars)
    out = eqn.outvars[0].aval.shape
    dn = p["dimension_numbers"]
    spatial = range(len(p["window_strides"]))
    valid = full = 1
    for d in spatial:
        size, k, o = lhs[dn.lhs_spec[2 + d]], rhs[dn.rhs_spec[2 + d]], out[dn.out_spec[2 + d]]
        valid *= window_taps(
            size, o, k, p["window_strides"][d], p["padding"][d][0], p["lhs_dilation"][d], p["rhs_dilation"][d]
        )
        full *= o * k
    # Every output feature of every example sums over its group's input features (rhs's in-feature size).
    macs = out[dn.out_spec[0]] * out[dn.out_spec[1]] * rhs[dn.rhs_spec[1]]
    return 2.0 * macs * valid, 2.0 * macs * full


def _equations(jaxpr: Any) -> Iterator[Any]:
    """Every equation of a jaxpr and of the jaxprs nested in its equations' parameters (jit, custom
    derivatives, control flow)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jex_core.jaxprs_in_params(eqn.params):
            yield from _equations(sub)


def padding_flops(fn: Callable, *args: Any) -> float:
    """The flops on padding taps of `fn`'s convolutions: the conventional count minus XLA's."""
    closed = jax.make_jaxpr(fn)(*args)
    total = 0.0
    for eqn in _equations(closed.jaxpr):
        if eqn.primitive.name == "conv_general_dilated":
            xla, conventional = conv_flops(eqn)
            total += conventional - xla
    return total


def module_padding_flops(module: nnx.Module, x: jax.ShapeDtypeStruct | jax.Array) -> float:
    """`padding_flops` of a module's train-mode forward on inputs shaped like `x`, traced through lax's
    convolution: the CPU formulations (`xla_cpu`) rewrite small maps as dense products whose taps can no
    longer be told apart. Shapes only: nothing is compiled or run."""
    twin = nnx.clone(module)
    for _, sub in nnx.iter_graph(twin):
        if isinstance(sub, nnx.Conv):
            sub.conv_general_dilated = xla_cpu.Conv("xla")
    graphdef, params, stats = nnx.split(twin, nnx.Param, nnx.BatchStat)

    def forward(params, stats, x):
        return steps.apply(graphdef, params, stats, x, train=True)

    return padding_flops(forward, params, stats, jax.ShapeDtypeStruct(x.shape, x.dtype))


def conventional(xla_flops: float, padding: float, passes: int) -> float:
    """A program's conventional count from XLA's and its forward's padding flops (`passes` convolution
    passes: 1 forward, 2 with the weight gradient, 3 with the input gradient too)."""
    if not (math.isfinite(padding) and padding >= 0 and passes >= 1):
        raise ValueError(f"need padding >= 0 and passes >= 1, got {padding}, {passes}")
    return xla_flops + passes * padding
