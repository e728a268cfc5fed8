"""Building blocks shared by the backbones: every stage maps (x_BHWC, train) -> x_BHWC.

BatchNorm follows PyTorch's conventions (momentum 0.1 in PyTorch's sense, i.e. 0.9 here; eps 1e-5)
so that weights port between the two frameworks and the training dynamics match the usual recipes.
Convolutions use He (fan-out) initialisation, as torchvision does for both backbones.

Convolutions on XLA:CPU take a faster formulation of the same math (see `conv_general_dilated`);
every other backend runs lax.conv_general_dilated unchanged. docs/speed.md has the measurements.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")

# ---------------------------------------------------------------------------------------------------
# Convolution and pooling on XLA:CPU (measurements: docs/speed.md).
#
# jaxlib 0.10's XLA:CPU hands 2-D convolutions to YNNPACK by default. Against its other convolution
# path (Eigen, selected with the XLA option in XLA_CPU_FLAGS / XLA_CPU_COMPILER_OPTIONS) YNNPACK is
# 1.5-2x slower on the forward and input-gradient convolutions of 32x32 maps and 3-25x slower on
# weight gradients, which autodiff emits as convolutions whose window is the whole feature map.
# Neither path handles 3x3 convolutions on 2x2 maps (VGG-16's last block on CIFAR): over a second
# per call at batch 128, 20-60x PyTorch. On CPU, `conv_general_dilated` below therefore
# - writes convolutions whose input map has at most DENSE_MAX_PIXELS pixels as one dense matrix
#   product over the whole map (block (input pixel, output pixel) of the matrix is the kernel tap
#   that joins them, zero where the window falls in the padding);
# - writes 1x1 convolutions as a strided slice and a matrix product;
# - keeps XLA's convolution for everything else, but computes the input gradient of strided
#   convolutions on large maps as one stride-1 convolution per output phase (polyphase; XLA's
#   input-dilated convolution is 2.5x slower) and, when YNNPACK runs the convolutions ("cpu-ynn"),
#   the weight gradient as im2col matrix products over batch chunks small enough to stay in cache.
# `MaxPool` with non-overlapping windows is a reshape and a max, whose gradient goes to the first
# maximum of each window in row-major order, as XLA's select-and-scatter and PyTorch do (XLA's
# reduce_window / select_and_scatter pair is 4x slower than PyTorch's pooling on CPU).
# Same math and parameter layout (HWIO kernels) everywhere; only the order of fp32 summation differs.
#
# The path is chosen when a function is traced: "auto" (default) is "xla" off CPU and on CPU "cpu"
# or "cpu-ynn" depending on whether this process's XLA hands convolutions to YNNPACK (probed once);
# "xla" is plain lax everywhere; set it with set_conv_impl() / conv_impl() or HIER_JAX_CONV.
# Jitted functions keep the path they were traced with.
# ---------------------------------------------------------------------------------------------------

CONV_IMPLS = ("auto", "xla", "cpu", "cpu-ynn")
_conv_impl = [os.environ.get("HIER_JAX_CONV", "auto")]
DENSE_MAX_PIXELS = 4  # input maps of at most this many pixels (2x2, 1x1) use the dense product
POLYPHASE_MIN_PIXELS = 1024  # strided convolutions on maps this large (32x32) take the polyphase dx
DW_CHUNK_ROWS = 4096  # cpu-ynn: rows (examples x output pixels) of one weight-gradient chunk
IM2COL_MIN_MACS = 50_000_000  # cpu-ynn: smaller weight gradients keep XLA's (faster to compile)

# XLA:CPU options that hand convolutions to Eigen instead of YNNPACK (dots and reductions stay with
# YNNPACK): as XLA_FLAGS, set before JAX initialises its CPU backend ...
XLA_CPU_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
# ... or per executable: jax.jit(f, compiler_options=XLA_CPU_COMPILER_OPTIONS) (same fusion list).
XLA_CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                            "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
# jaxlib 0.10's default list (convolutions to YNNPACK), to compile the stock way in a process whose
# XLA_FLAGS carry XLA_CPU_FLAGS (benchmarks' "before" variants).
XLA_CPU_DEFAULT_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                                    "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE,"
                                    "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}


def set_conv_impl(impl: str) -> None:
    """Select the convolution path for functions traced from now on (one of CONV_IMPLS)."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"unknown convolution implementation {impl!r}; valid: {', '.join(CONV_IMPLS)}")
    _conv_impl[0] = impl


@contextlib.contextmanager
def conv_impl(impl: str) -> Iterator[None]:
    """Trace under a given convolution path, e.g. `with conv_impl("xla"): jax.jit(f).lower(...)`."""
    previous = _conv_impl[0]
    set_conv_impl(impl)
    try:
        yield
    finally:
        _conv_impl[0] = previous


def configure_xla_cpu() -> bool:
    """Append XLA_CPU_FLAGS to XLA_FLAGS if JAX's backends are not initialised yet (True if set).

    Call it before the first JAX computation of the process; the flag only exists in jaxlibs with
    the YNNPACK convolution fusion (0.9 / 0.10), and XLA aborts on unknown flags, so nothing is set
    for other versions.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" in flags:
        return False
    try:
        from jax._src import xla_bridge
        initialized = xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):
        return False
    major_minor = tuple(int(v) for v in jax.__version__.split(".")[:2])
    if initialized or major_minor not in ((0, 9), (0, 10)):
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {XLA_CPU_FLAGS}".strip()
    return True


def probe_conv_hlo(compiler_options: dict | None = None) -> str:
    """Compiled HLO text of a plain 3x3 NHWC convolution under this process's XLA flags."""
    x = jax.ShapeDtypeStruct((1, 4, 4, 32), jnp.float32)
    w = jax.ShapeDtypeStruct((3, 3, 32, 32), jnp.float32)
    lowered = jax.jit(lambda x, w: _lax_conv(x, w, (1, 1), ((1, 1), (1, 1)))).lower(x, w)
    return lowered.compile(compiler_options=compiler_options).as_text()


@functools.cache
def _ynn_takes_convolutions() -> bool:
    """Does this process's XLA:CPU hand a plain NHWC convolution to YNNPACK?"""
    return hlo_uses_ynn(probe_conv_hlo())


def hlo_uses_ynn(hlo_text: str) -> bool:
    """Does compiled HLO text hold a YNNPACK fusion? (instruction names, not the metadata, which names
    Python functions: this module's own `_ynn_takes_convolutions` made a plain substring test always true)"""
    return "%ynn_fusion" in hlo_text


def _resolved_impl() -> str:
    impl = _conv_impl[0]
    if impl not in CONV_IMPLS:
        raise ValueError(f"HIER_JAX_CONV={impl!r} is not one of {', '.join(CONV_IMPLS)}")
    if impl != "auto":
        return impl
    if jax.default_backend() != "cpu":
        return "xla"
    return "cpu-ynn" if _ynn_takes_convolutions() else "cpu"


_DN = ("NHWC", "HWIO", "NHWC")


def _lax_conv(x, w, strides, padding):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_DN)


def _out_size(size: int, k: int, stride: int, pad: Sequence[int]) -> int:
    return (size + pad[0] + pad[1] - k) // stride + 1


def _dense_conv(x, w, strides, padding):
    """The convolution as x[B, H*W*Ci] @ M[H*W*Ci, Ho*Wo*Co]: block (input pixel, output pixel) of M is
    the kernel tap that connects them, or zero. For maps of a few pixels only (M grows as (H*W)^2)."""
    b, h, wd, ci = x.shape
    kh, kw, _, co = w.shape
    (sh, sw), (ph, pw) = strides, padding
    ho, wo = _out_size(h, kh, sh, ph), _out_size(wd, kw, sw, pw)
    zero = jnp.zeros((ci, co), w.dtype)
    rows = []
    for a in range(h):
        for c in range(wd):
            blocks = []
            for oi in range(ho):
                for oj in range(wo):
                    i, j = a - oi * sh + ph[0], c - oj * sw + pw[0]
                    blocks.append(w[i, j] if 0 <= i < kh and 0 <= j < kw else zero)
            rows.append(jnp.concatenate(blocks, axis=1))
    m = jnp.concatenate(rows, axis=0)
    return (x.reshape(b, h * wd * ci) @ m).reshape(b, ho, wo, co)


def _pointwise_conv(x, w, strides, padding):
    """1x1 convolution: (pad,) strided slice, then a matrix product over channels."""
    if any(p for pad in padding for p in pad):
        x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    (sh, sw) = strides
    if (sh, sw) != (1, 1):
        x = x[:, ::sh, ::sw]
    return lax.dot_general(x, w[0, 0], (((3,), (0,)), ((), ())))


def _phase_taps(a: int, stride: int, pad_lo: int, k: int) -> tuple[int, list[int]] | None:
    """Output phase `a` of a strided convolution's input gradient: dx[s*m + a] = sum_t dy[m + d0 + t] w[taps[t]]."""
    offsets = sorted((a + pad_lo - i) // stride for i in range(k) if (a + pad_lo - i) % stride == 0)
    if not offsets:
        return None
    d0 = offsets[0]
    return d0, [a + pad_lo - stride * (d0 + t) for t in range(offsets[-1] - d0 + 1)]


def _polyphase_input_grad(dy, w, x_shape, strides, padding):
    """Input gradient of a strided convolution as stride-1 convolutions of dy, one per output phase."""
    b, h, wd, c = x_shape
    _, ho, wo, o = dy.shape
    (sh, sw), (ph, pw) = strides, padding
    mh, mw = -(-h // sh), -(-wd // sw)  # rows / cols of the largest phase
    phases = []
    for a in range(sh):
        row = []
        for bb in range(sw):
            rows_a, cols_b = (h - a + sh - 1) // sh, (wd - bb + sw - 1) // sw
            taps_h, taps_w = _phase_taps(a, sh, ph[0], w.shape[0]), _phase_taps(bb, sw, pw[0], w.shape[1])
            if taps_h is None or taps_w is None or rows_a <= 0 or cols_b <= 0:
                part = jnp.zeros((b, max(rows_a, 0), max(cols_b, 0), c), dy.dtype)
            else:
                (d_h, ih), (d_w, iw) = taps_h, taps_w
                kernel = jnp.stack([jnp.stack([w[i, j] for j in iw]) for i in ih]).swapaxes(2, 3)  # [T, U, O, C]
                len_h, len_w = rows_a + len(ih) - 1, cols_b + len(iw) - 1
                dyp = lax.pad(dy, jnp.zeros((), dy.dtype),
                              ((0, 0, 0), (-d_h, len_h - (ho - d_h), 0), (-d_w, len_w - (wo - d_w), 0), (0, 0, 0)))
                if len(ih) == 1 and len(iw) == 1:
                    part = lax.dot_general(dyp, kernel[0, 0], (((3,), (0,)), ((), ())))
                else:
                    part = _lax_conv(dyp, kernel, (1, 1), ((0, 0), (0, 0)))
            row.append(jnp.pad(part, ((0, 0), (0, mh - part.shape[1]), (0, mw - part.shape[2]), (0, 0))))
        phases.append(jnp.stack(row, axis=3))  # [B, mh, mw, sw, C]
    full = jnp.stack(phases, axis=2)  # [B, mh, sh, mw, sw, C]: dx[s*m + a, s*n + b] = phase (a, b) at (m, n)
    return full.reshape(b, mh * sh, mw * sw, c)[:, :h, :wd]


def _chunk(batch: int, rows_per_example: int) -> int:
    """Largest divisor of `batch` whose chunk has at most DW_CHUNK_ROWS rows (at least 1 example)."""
    target = max(1, DW_CHUNK_ROWS // max(rows_per_example, 1))
    return max(d for d in range(1, min(batch, target) + 1) if batch % d == 0)


def _im2col_weight_grad(x, dy, kernel_shape, strides, padding):
    """dL/dw = sum over batch and output pixels of patch(x)^T dy, as im2col products over batch chunks."""
    b, h, wd, ci = x.shape
    kh, kw, _, co = kernel_shape
    (sh, sw), (ph, pw) = strides, padding
    _, ho, wo, _ = dy.shape
    xp = jnp.pad(x, ((0, 0), tuple(ph), tuple(pw), (0, 0))) if any(ph) or any(pw) else x
    # Rows/cols past the last window are never read; crop them so the slices below stay in bounds.
    xp = xp[:, :(ho - 1) * sh + kh, :(wo - 1) * sw + kw]
    chunk = _chunk(b, ho * wo)

    def partial(xc, dyc):  # [n, Hp, Wp, Ci], [n, Ho, Wo, Co] -> [Co, kh*kw*Ci]
        n = xc.shape[0]
        taps = [lax.slice(xc, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, ci), (1, sh, sw, 1))
                for i in range(kh) for j in range(kw)]
        patches = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
        return lax.dot_general(dyc.reshape(n * ho * wo, co), patches.reshape(n * ho * wo, kh * kw * ci),
                               (((0,), (0,)), ((), ())))

    if chunk == b:
        acc = partial(xp, dy)
    else:
        chunks = (xp.reshape(b // chunk, chunk, *xp.shape[1:]), dy.reshape(b // chunk, chunk, ho, wo, co))
        acc, _ = lax.scan(lambda acc, c: (acc + partial(*c), None), jnp.zeros((co, kh * kw * ci), dy.dtype),
                          chunks)
    return acc.T.reshape(kh, kw, ci, co)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _cpu_conv(x, w, strides, padding, ynn):
    return _lax_conv(x, w, strides, padding)


def _cpu_conv_fwd(x, w, strides, padding, ynn):
    return _lax_conv(x, w, strides, padding), (x, w)


def _cpu_conv_bwd(strides, padding, ynn, residuals, dy):
    x, w = residuals
    if strides != (1, 1) and x.shape[1] * x.shape[2] >= POLYPHASE_MIN_PIXELS:
        dx = _polyphase_input_grad(dy, w, x.shape, strides, padding)
    else:
        dx = jax.vjp(lambda x_: _lax_conv(x_, w, strides, padding), x)[1](dy)[0]
    if ynn and dy.size * x.shape[-1] * w.shape[0] * w.shape[1] >= IM2COL_MIN_MACS:
        dw = _im2col_weight_grad(x, dy, w.shape, strides, padding)
    else:  # Eigen runs autodiff's weight-gradient convolution as fast as PyTorch (docs/speed.md)
        dw = jax.vjp(lambda w_: _lax_conv(x, w_, strides, padding), w)[1](dy)[0]
    return dx, dw


_cpu_conv.defvjp(_cpu_conv_fwd, _cpu_conv_bwd)


def _canonical_nhwc(dimension_numbers, ndim: int) -> bool:
    if dimension_numbers is None or ndim != 4:
        return False  # lax's default is NCHW/OIHW
    dn = lax.conv_dimension_numbers((1,) * ndim, (1,) * ndim, dimension_numbers)
    return (dn.lhs_spec, dn.rhs_spec, dn.out_spec) == ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """Drop-in for lax.conv_general_dilated (as nnx.Conv calls it) with the CPU paths described above.

    They cover what the backbones use: 2-D NHWC/HWIO convolutions with explicit padding, no dilation,
    no groups; anything else, and every non-CPU backend, goes to lax.conv_general_dilated.
    """
    simple = (_canonical_nhwc(dimension_numbers, lhs.ndim) and feature_group_count == 1
              and not kwargs.get("preferred_element_type") and not isinstance(padding, str)
              and len(window_strides) == 2
              and all(d in (None, 1) for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))))
    impl = _resolved_impl() if simple else "xla"
    if impl == "xla":
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, precision=precision, **kwargs)
    strides = tuple(int(s) for s in window_strides)
    pads = tuple(tuple(int(v) for v in p) for p in padding)
    if lhs.shape[1] * lhs.shape[2] <= DENSE_MAX_PIXELS:
        return _dense_conv(lhs, rhs, strides, pads)
    if rhs.shape[0] == rhs.shape[1] == 1:
        return _pointwise_conv(lhs, rhs, strides, pads)
    return _cpu_conv(lhs, rhs, strides, pads, impl == "cpu-ynn")


def _first_max_masks(windows: list[jax.Array], peak: jax.Array) -> list[jax.Array]:
    """One mask per window position: true where that position holds the window's first maximum."""
    taken = None
    masks = []
    for v in windows:
        hit = v == peak
        masks.append(hit if taken is None else hit & ~taken)
        taken = hit if taken is None else taken | hit
    return masks


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _block_max_pool(x: jax.Array, k: int) -> jax.Array:
    b, h, w, c = x.shape
    return x.reshape(b, h // k, k, w // k, k, c).max(axis=(2, 4))


def _block_max_pool_fwd(x, k):
    y = _block_max_pool(x, k)
    return y, (x, y)


def _block_max_pool_bwd(k, residuals, dy):
    x, y = residuals
    b, h, w, c = x.shape
    xr = x.reshape(b, h // k, k, w // k, k, c)
    windows = [xr[:, :, i, :, j, :] for i in range(k) for j in range(k)]  # row-major window order
    zero = jnp.zeros((), dy.dtype)
    parts = [jnp.where(m, dy, zero) for m in _first_max_masks(windows, y)]
    rows = [jnp.stack(parts[i * k:(i + 1) * k], axis=3) for i in range(k)]  # [B, Ho, Wo, k(j), C]
    return (jnp.stack(rows, axis=2).reshape(b, h, w, c),)  # [B, Ho, k(i), Wo, k(j), C]


_block_max_pool.defvjp(_block_max_pool_fwd, _block_max_pool_bwd)


def batch_norm(channels: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(channels, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, rngs=rngs)


def conv(cin: int, cout: int, kernel: int, stride: int = 1, *, bias: bool, rngs: nnx.Rngs) -> nnx.Conv:
    pad = kernel // 2
    return nnx.Conv(cin, cout, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
                    use_bias=bias, kernel_init=conv_init, conv_general_dilated=conv_general_dilated, rngs=rngs)


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

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        del train
        k = self.window
        if (self.padding == 0 and self.stride == k and x.ndim == 4 and x.shape[1] % k == 0 and x.shape[2] % k == 0
                and _resolved_impl() != "xla"):
            return _block_max_pool(x, k)
        pad = ((self.padding, self.padding), (self.padding, self.padding))
        return nnx.max_pool(x, (self.window, self.window), (self.stride, self.stride), padding=pad)


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
        shortcut = x if self.shortcut_conv is None else self.shortcut_bn(
            self.shortcut_conv(x), use_running_average=ura)
        return nnx.relu(y + shortcut)


class Classifier(nnx.Module):
    """Global average pooling then one linear layer: the final classifier of both backbones."""

    def __init__(self, cin: int, num_classes: int, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(cin, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        del train
        return self.linear(jnp.mean(x, axis=(1, 2)))
