"""The XLA:CPU speed path: the process option, the probe, and faster formulations of the same math.

jaxlib 0.10's XLA:CPU hands 2-D convolutions to YNNPACK by default. Against its other convolution
path (Eigen, selected with the XLA option in XLA_CPU_FLAGS / XLA_CPU_COMPILER_OPTIONS) YNNPACK is
1.5-2x slower on the forward and input-gradient convolutions of 32x32 maps and 3-25x slower on
weight gradients, which autodiff emits as convolutions whose window is the whole feature map.
Neither path handles 3x3 convolutions on 2x2 maps (VGG-16's last block on CIFAR): over a second
per call at batch 128, 20-60x PyTorch. On CPU, `conv_general_dilated` below therefore
- writes convolutions whose input map has at most DENSE_MAX_PIXELS pixels as one dense matrix
  product over the whole map (block (input pixel, output pixel) of the matrix is the kernel tap
  that joins them, zero where the window falls in the padding);
- writes 1x1 convolutions as a strided slice and a matrix product;
- keeps XLA's convolution for everything else, but computes the input gradient of strided
  convolutions on large maps as one stride-1 convolution per output phase (polyphase; XLA's
  input-dilated convolution is 2.5x slower) and, when YNNPACK runs the convolutions ("cpu-ynn"),
  the weight gradient as im2col matrix products over batch chunks small enough to stay in cache;
- hands the weight gradient's convolution its input through a loop XLA cannot fuse across, so that
  the transpose it needs reads the activation instead of recomputing BatchNorm, ReLU and residual
  adds from the convolution outputs (`_read_not_recomputed`).
`block_max_pool` (non-overlapping windows) is a reshape and a max, whose gradient goes to the first
maximum of each window in row-major order, as XLA's select-and-scatter and PyTorch do (XLA's
reduce_window / select_and_scatter pair is 4x slower than PyTorch's pooling on CPU).
Same math and parameter layout (HWIO kernels) everywhere; only the order of fp32 summation differs.
bfloat16 inputs (precision policy "bf16") are computed in float32 and the result rounded once, as
lax's convolution does them on XLA:CPU (a sum of bf16-rounded partial products would not be);
`block_max_pool` keeps any dtype exactly.
Measurements: docs/speed.md.

The formulation is fixed when a layer is built, not when it is traced: `models.layers` resolves
`default_impl()` ("auto" unless set_conv_impl() / conv_impl() say otherwise) into
"xla", "cpu" or "cpu-ynn" and keeps it in the module, so it is part of the model's GraphDef, which
every jitted step closes over. Changing the default later changes the layers built later, never
code already traced. "auto" is "xla" off CPU and, on CPU, "cpu" or "cpu-ynn" depending on whether
this process's XLA hands convolutions to YNNPACK (probed once).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import warnings
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
from jax import lax

CONV_IMPLS = ("auto", "xla", "cpu", "cpu-ynn")
DENSE_MAX_PIXELS = 4  # input maps of at most this many pixels (2x2, 1x1) use the dense product
POLYPHASE_MIN_PIXELS = 1024  # strided convolutions on maps this large (32x32) take the polyphase dx
DW_CHUNK_ROWS = 4096  # cpu-ynn: rows (examples x output pixels) of one weight-gradient chunk
IM2COL_MIN_MACS = 50_000_000  # cpu-ynn: smaller weight gradients keep XLA's (faster to compile)

# XLA:CPU options that hand convolutions to Eigen instead of YNNPACK (dots and reductions stay with
# YNNPACK): as XLA_FLAGS, set before JAX initialises its CPU backend ...
XLA_CPU_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
# ... or per executable: jax.jit(f, compiler_options=XLA_CPU_COMPILER_OPTIONS) (same fusion list).
XLA_CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"
}
# jaxlib 0.10's default list (convolutions to YNNPACK), to compile the stock way in a process whose
# XLA_FLAGS carry XLA_CPU_FLAGS (benchmarks' "before" variants).
XLA_CPU_DEFAULT_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE,"
    "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
}
FLAG_JAX_VERSIONS = ((0, 9), (0, 10))  # the jax/jaxlib minor versions whose XLA has the option
SLOWDOWN = "train steps on XLA:CPU run about 1.3-1.4x slower (docs/speed.md)"

_default_impl = ["auto"]
# Why the option is not set in this process, once configure_flags() has been asked (None: it is set).
_flags_missing_because: list[str | None] = ["hier_jax.process.setup() was not called before JAX started"]


def configure_flags() -> bool:
    """Append XLA_CPU_FLAGS to XLA_FLAGS if JAX's backends are not initialised yet; True if the
    process has the option now (set here or before). Call it before the first JAX computation;
    `hier_jax.process.setup()` does. The option exists only in jaxlib 0.9 / 0.10 and XLA aborts on
    unknown flags, so nothing is set for other versions; `resolve_impl` then warns once, on CPU."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" in flags:
        _flags_missing_because[0] = None
        return True
    major_minor = tuple(int(v) for v in jax.__version__.split(".")[:2])
    if major_minor not in FLAG_JAX_VERSIONS:
        _flags_missing_because[0] = f"jax {jax.__version__} has no XLA:CPU option to move convolutions off YNNPACK"
        return False
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        _flags_missing_because[0] = "JAX's backends were initialised before hier_jax.process.setup()"
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {XLA_CPU_FLAGS}".strip()
    _flags_missing_because[0] = None
    return True


def default_impl() -> str:
    return _default_impl[0]


def set_conv_impl(impl: str) -> None:
    """Select the formulation of layers built from now on (one of CONV_IMPLS)."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"unknown convolution implementation {impl!r}; valid: {', '.join(CONV_IMPLS)}")
    _default_impl[0] = impl


@contextlib.contextmanager
def conv_impl(impl: str) -> Iterator[None]:
    """Build under a given formulation, e.g. `with conv_impl("xla"): model = build_model(...)`."""
    previous = _default_impl[0]
    set_conv_impl(impl)
    try:
        yield
    finally:
        _default_impl[0] = previous


def probe_conv_hlo(compiler_options: dict | None = None) -> str:
    """Compiled HLO text of a plain 3x3 NHWC convolution under this process's XLA flags."""
    x = jax.ShapeDtypeStruct((1, 4, 4, 32), jnp.float32)
    w = jax.ShapeDtypeStruct((3, 3, 32, 32), jnp.float32)
    lowered = jax.jit(lambda x, w: _lax_conv(x, w, (1, 1), ((1, 1), (1, 1)))).lower(x, w)
    text = lowered.compile(compiler_options=compiler_options).as_text()
    assert text is not None  # None only where a backend has no text view
    return text


@functools.cache
def ynn_takes_convolutions() -> bool:
    """Does this process's XLA:CPU hand a plain NHWC convolution to YNNPACK? (probed once)"""
    return hlo_uses_ynn(probe_conv_hlo())


def hlo_uses_ynn(hlo_text: str) -> bool:
    """Does compiled HLO text hold a YNNPACK fusion? (instruction names, not the metadata, which names
    Python functions: a plain substring test matched this module's own function names)"""
    return "%ynn_fusion" in hlo_text


@functools.cache
def _warn_slow_once(reason: str) -> None:
    warnings.warn(
        f"hier-jax: XLA:CPU runs convolutions on YNNPACK in this process ({reason}); {SLOWDOWN}",
        RuntimeWarning,
        stacklevel=4,
    )


def resolve_impl(impl: str | None = None) -> str:
    """The concrete formulation ("xla", "cpu" or "cpu-ynn") for `impl` (default: `default_impl()`).

    "auto" off CPU is "xla"; on CPU it is "cpu", or "cpu-ynn" when this process's XLA hands
    convolutions to YNNPACK, which costs speed and is warned about once.
    """
    impl = default_impl() if impl is None else impl
    if impl not in CONV_IMPLS:
        raise ValueError(f"convolution implementation {impl!r} is not one of {', '.join(CONV_IMPLS)}")
    if impl != "auto":
        return impl
    if jax.default_backend() != "cpu":
        return "xla"
    if ynn_takes_convolutions():
        _warn_slow_once(_flags_missing_because[0] or "XLA_FLAGS hand them back")
        return "cpu-ynn"
    return "cpu"


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
                dyp = lax.pad(
                    dy,
                    jnp.zeros((), dy.dtype),
                    ((0, 0, 0), (-d_h, len_h - (ho - d_h), 0), (-d_w, len_w - (wo - d_w), 0), (0, 0, 0)),
                )
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
    xp = xp[:, : (ho - 1) * sh + kh, : (wo - 1) * sw + kw]
    chunk = _chunk(b, ho * wo)

    def partial(xc, dyc):  # [n, Hp, Wp, Ci], [n, Ho, Wo, Co] -> [Co, kh*kw*Ci]
        n = xc.shape[0]
        taps = [
            lax.slice(xc, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, ci), (1, sh, sw, 1))
            for i in range(kh)
            for j in range(kw)
        ]
        patches = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
        return lax.dot_general(
            dyc.reshape(n * ho * wo, co), patches.reshape(n * ho * wo, kh * kw * ci), (((0,), (0,)), ((), ()))
        )

    if chunk == b:
        acc = partial(xp, dy)
    else:
        chunks = (xp.reshape(b // chunk, chunk, *xp.shape[1:]), dy.reshape(b // chunk, chunk, ho, wo, co))
        acc, _ = lax.scan(lambda acc, c: (acc + partial(*c), None), jnp.zeros((co, kh * kw * ci), dy.dtype), chunks)
    return acc.T.reshape(kh, kw, ci, co)


def _read_not_recomputed(x, dy):
    """x, as a value XLA:CPU must read from memory rather than recompute.

    The weight gradient's convolution reads x transposed, and XLA fuses the elementwise chain that
    produced x (BatchNorm, ReLU, and in a ResNet the residual adds of up to three blocks before)
    into that transpose, recomputing it from the convolution outputs. Those transposes took about
    a quarter of the ResNet-18 edge step (docs/speed.md). lax.optimization_barrier would say "do not
    fuse across", but XLA:CPU expands barriers before fusion; a while loop is a boundary no fusion
    crosses. This one runs zero times: its trip count is 1 only if dy[0, 0, 0, 0] is NaN, which the
    compiler cannot rule out, so it keeps the loop; in that case the loop adds 0 to x.
    """
    runs = (dy[0, 0, 0, 0] != dy[0, 0, 0, 0]).astype(jnp.int32)
    return lax.while_loop(
        lambda c: c[1] < runs, lambda c: (c[0] + c[1].astype(c[0].dtype), c[1] + 1), (x, jnp.int32(0))
    )[0]


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
        x = _read_not_recomputed(x, dy)
        dw = jax.vjp(lambda w_: _lax_conv(x, w_, strides, padding), w)[1](dy)[0]
    return dx, dw


_cpu_conv.defvjp(_cpu_conv_fwd, _cpu_conv_bwd)


def _canonical_nhwc(dimension_numbers, ndim: int) -> bool:
    if dimension_numbers is None or ndim != 4:
        return False  # lax's default is NCHW/OIHW
    dn = lax.conv_dimension_numbers((1,) * ndim, (1,) * ndim, dimension_numbers)
    return (dn.lhs_spec, dn.rhs_spec, dn.out_spec) == ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    precision=None,
    *,
    impl: str,
    **kwargs,
):
    """lax.conv_general_dilated's signature plus `impl` ("xla", "cpu" or "cpu-ynn"; see `resolve_impl`).

    The CPU paths cover what the backbones use: 2-D NHWC/HWIO convolutions with explicit padding, no
    dilation, no groups; anything else, and impl "xla", goes to lax.conv_general_dilated. Inputs in a
    narrower float (bfloat16) take the float32 path and the result is cast back: products and sums in
    float32, one rounding of the output (and, in the backward pass, of each gradient), which is what
    lax's bf16 convolution gives on XLA:CPU and cuDNN's on GPU.
    """
    if impl not in CONV_IMPLS[1:]:
        raise ValueError(f"impl must be resolved to one of {', '.join(CONV_IMPLS[1:])}, got {impl!r}")
    simple = (
        _canonical_nhwc(dimension_numbers, lhs.ndim)
        and feature_group_count == 1
        and not kwargs.get("preferred_element_type")
        and not isinstance(padding, str)
        and len(window_strides) == 2
        and all(d in (None, 1) for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
    )
    if impl == "xla" or not simple:
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation,
            rhs_dilation,
            dimension_numbers,
            feature_group_count,
            precision=precision,
            **kwargs,
        )
    dtype = jnp.result_type(lhs, rhs)
    if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:  # bf16: float32 math, one rounding
        out = conv_general_dilated(
            lhs.astype(jnp.float32),
            rhs.astype(jnp.float32),
            window_strides,
            padding,
            lhs_dilation,
            rhs_dilation,
            dimension_numbers,
            feature_group_count,
            precision,
            impl=impl,
        )
        return out.astype(dtype)
    strides = tuple(int(s) for s in window_strides)
    pads = tuple(tuple(int(v) for v in p) for p in padding)
    if lhs.shape[1] * lhs.shape[2] <= DENSE_MAX_PIXELS:
        return _dense_conv(lhs, rhs, strides, pads)
    if rhs.shape[0] == rhs.shape[1] == 1:
        return _pointwise_conv(lhs, rhs, strides, pads)
    return _cpu_conv(lhs, rhs, strides, pads, impl == "cpu-ynn")


@dataclasses.dataclass(frozen=True)
class Conv:
    """What nnx.Conv calls as its `conv_general_dilated`: the formulation fixed at build time. Frozen
    and compared by value, so two models built alike have equal GraphDefs."""

    impl: str

    def __post_init__(self):
        if self.impl not in CONV_IMPLS[1:]:
            raise ValueError(f"impl must be resolved to one of {', '.join(CONV_IMPLS[1:])}, got {self.impl!r}")

    def __call__(self, *args, **kwargs):
        return conv_general_dilated(*args, impl=self.impl, **kwargs)


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
def block_max_pool(x_BHWC: jax.Array, k: int) -> jax.Array:
    """k x k max-pooling with stride k (H and W divisible by k); gradient to each window's first max."""
    x = x_BHWC
    b, h, w, c = x.shape
    return x.reshape(b, h // k, k, w // k, k, c).max(axis=(2, 4))


def _block_max_pool_fwd(x, k):
    y = block_max_pool(x, k)
    return y, (x, y)


def _block_max_pool_bwd(k, residuals, dy):
    x, y = residuals
    b, h, w, c = x.shape
    xr = x.reshape(b, h // k, k, w // k, k, c)
    windows = [xr[:, :, i, :, j, :] for i in range(k) for j in range(k)]  # row-major window order
    zero = jnp.zeros((), dy.dtype)
    parts = [jnp.where(m, dy, zero) for m in _first_max_masks(windows, y)]
    rows = [jnp.stack(parts[i * k : (i + 1) * k], axis=3) for i in range(k)]  # [B, Ho, Wo, k(j), C]
    return (jnp.stack(rows, axis=2).reshape(b, h, w, c),)  # [B, Ho, k(i), Wo, k(j), C]


block_max_pool.defvjp(_block_max_pool_fwd, _block_max_pool_bwd)
