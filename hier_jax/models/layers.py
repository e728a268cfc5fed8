"""Building blocks shared by the backbones: every stage maps (x_BHWC, train) -> x_BHWC.

BatchNorm follows PyTorch's conventions (momentum 0.1 in PyTorch's sense, i.e. 0.9 here; eps 1e-5)
so that weights port between the two frameworks and the training dynamics match the usual recipes.
Convolutions use He (fan-out) initialisation, as torchvision does for both backbones.

Convolutions and non-overlapping max-pooling on XLA:CPU take a faster formulation of the same math
(hier_jax.models.xla_cpu); every other backend runs lax unchanged. Each layer resolves the
formulation when it is built and keeps it (xla_cpu.resolve_impl), so a jitted step never reuses code
traced for another one. The compute dtype is fixed the same way (hier_jax.precision.build_policy):
float32 parameters always, activations in the policy's dtype; BatchNorm normalizes in float32 and
keeps its statistics in float32 whatever the activations' dtype (`_promote_input_only`).
"""

from __future__ import annotations

from typing import Any, TypeVar, cast

import jax
import jax.numpy as jnp
from flax import nnx

from hier_jax import precision
from hier_jax.models import xla_cpu

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
_Args = TypeVar("_Args", bound=tuple)


def _promote_input_only(args: _Args, dtype: Any = None, *, inexact: bool = True) -> _Args:
    """BatchNorm's promote_dtype: the input in the compute dtype, the running mean/var, scale and bias
    as they are (float32). flax's default casts them all to `dtype`, which under bfloat16 would
    normalize with bf16-rounded running statistics in inference; this way the normalization runs in
    float32 and only its output is cast (flax computes the batch statistics in at least float32, and
    the running averages it stores stay float32, either way). `inexact` is flax's PromoteDtypeFn
    parameter, unused here (BatchNorm does not pass it)."""
    x, *rest = args
    return cast(_Args, (x if dtype is None else jnp.asarray(x, dtype), *rest))


def batch_norm(channels: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(
        channels,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        dtype=precision.build_policy().compute_dtype,
        param_dtype=jnp.float32,
        promote_dtype=_promote_input_only,
        rngs=rngs,
    )


def conv(cin: int, cout: int, kernel: int, stride: int = 1, *, bias: bool, rngs: nnx.Rngs) -> nnx.Conv:
    pad = kernel // 2
    return nnx.Conv(
        cin,
        cout,
        (kernel, kernel),
        strides=stride,
        padding=((pad, pad), (pad, pad)),
        use_bias=bias,
        kernel_init=conv_init,
        conv_general_dilated=xla_cpu.Conv(xla_cpu.resolve_impl()),
        dtype=precision.build_policy().compute_dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


def linear(cin: int, cout: int, *, rngs: nnx.Rngs) -> nnx.Linear:
    """A linear layer (flax's default initialisation) computing in the build policy's dtype."""
    return nnx.Linear(cin, cout, dtype=precision.build_policy().compute_dtype, param_dtype=jnp.float32, rngs=rngs)


class ConvBNReLU(nnx.Module):
    """conv -> BatchNorm -> ReLU; `bias` keeps a conv bias (VGG does, ResNet does not)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, *, bias: bool, rngs: nnx.Rngs):
        self.conv = conv(cin, cout, kernel, stride, bias=bias, rngs=rngs)
        self.bn = batch_norm(cout, rngs)
        self.out_channels = cout

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        return nnx.relu(self.bn(self.conv(x), use_running_average=not train))


class MaxPool(nnx.Module):
    """Parameter-free max-pooling stage (window `window`, stride `stride`, PyTorch-style padding)."""

    def __init__(self, window: int = 2, stride: int = 2, padding: int = 0):
        self.window, self.stride, self.padding = window, stride, padding
        self.impl = xla_cpu.resolve_impl()

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        del train
        k = self.window
        if (
            self.padding == 0
            and self.stride == k
            and x.ndim == 4
            and x.shape[1] % k == 0
            and x.shape[2] % k == 0
            and self.impl != "xla"
        ):
            return xla_cpu.block_max_pool(x, k)
        pad = ((self.padding, self.padding), (self.padding, self.padding))
        return nnx.max_pool(x, (self.window, self.window), (self.stride, self.stride), padding=pad)  # pyright: ignore[reportArgumentType] - flax leaves padding unannotated; (low, high) pairs are valid


class BasicBlock(nnx.Module):
    """ResNet BasicBlock (He et al., 2016): two 3x3 conv-BN, identity or 1x1 conv-BN shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs):
        self.conv1 = conv(cin, cout, 3, stride, bias=False, rngs=rngs)
        self.bn1 = batch_norm(cout, rngs)
        self.conv2 = conv(cout, cout, 3, 1, bias=False, rngs=rngs)
        self.bn2 = batch_norm(cout, rngs)
        if stride != 1 or cin != cout:
            self.shortcut_conv = conv(cin, cout, 1, stride, bias=False, rngs=rngs)
            self.shortcut_bn = batch_norm(cout, rngs)
        else:
            self.shortcut_conv = None
            self.shortcut_bn = None
        self.out_channels = cout

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        ura = not train
        y = nnx.relu(self.bn1(self.conv1(x), use_running_average=ura))
        y = self.bn2(self.conv2(y), use_running_average=ura)
        if self.shortcut_conv is None:
            shortcut = x
        else:
            assert self.shortcut_bn is not None  # set together with shortcut_conv
            shortcut = self.shortcut_bn(self.shortcut_conv(x), use_running_average=ura)
        return nnx.relu(y + shortcut)


class Classifier(nnx.Module):
    """Global average pooling then one linear layer: the final classifier of both backbones."""

    def __init__(self, cin: int, num_classes: int, *, rngs: nnx.Rngs):
        self.linear = linear(cin, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        del train
        return self.linear(jnp.mean(x, axis=(1, 2)))
