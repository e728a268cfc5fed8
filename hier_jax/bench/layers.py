"""Per-op variants for bench_layers: each convolution pass (forward, dx, dw) and BatchNorm+ReLU in every
JAX formulation and in PyTorch, checked against lax and timed in turns."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from hier_jax.bench.shapes import CONV_DIMENSIONS, BNShape, ConvShape, layers_text
from hier_jax.bench.timing import Variant, measure

DEFAULT_MODELS = ("vgg16", "resnet18")
FORMULATIONS = ("eigen", "ynnpack", "cpu", "cpu-ynn")
TORCH_MODES = ("channels_last", "nchw")
OPS = ("conv", "bn")
PASSES = {"conv": ("forward", "dx", "dw"), "bn": ("forward", "backward")}
BN_VARIANT = "nnx"
RTOL = 1e-4


def compiled(fn: Callable, args: tuple, options: dict | None) -> tuple[Callable, float]:
    """fn jitted and compiled ahead for `args` under XLA `options`; (executable, compile seconds)."""
    import jax

    start = time.perf_counter()
    exe = jax.jit(fn).lower(*args).compile(compiler_options=options)
    return exe, time.perf_counter() - start


def _waiting(exe: Callable, args: tuple) -> Callable[[], Any]:
    import jax

    return lambda: jax.block_until_ready(exe(*args))


def jax_conv_variant(formulation: str, shape: ConvShape, x, w, dy) -> Variant:
    """One JAX formulation's forward, dx and dw of `shape`, compiled for the arrays given."""
    import jax
    from jax import lax

    from hier_jax.models import xla_cpu

    eigen, stock = xla_cpu.XLA_CPU_COMPILER_OPTIONS, xla_cpu.XLA_CPU_DEFAULT_COMPILER_OPTIONS
    options = {"eigen": eigen, "ynnpack": stock, "cpu": eigen, "cpu-ynn": stock}[formulation]
    strides, padding = shape.strides, shape.padding

    def lax_conv(x, w):
        return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=CONV_DIMENSIONS)

    def xla_cpu_conv(x, w):
        return xla_cpu.conv_general_dilated(x, w, strides, padding, dimension_numbers=CONV_DIMENSIONS, impl=formulation)

    conv = lax_conv if formulation in ("eigen", "ynnpack") else xla_cpu_conv

    fns = {
        "forward": (lambda x, w, dy: conv(x, w)),
        "dx": (lambda x, w, dy: jax.vjp(lambda x_: conv(x_, w), x)[1](dy)[0]),
        "dw": (lambda x, w, dy: jax.vjp(lambda w_: conv(x, w_), w)[1](dy)[0]),
    }
    calls, compile_s = {}, {}
    for name, fn in fns.items():
        exe, compile_s[name] = compiled(fn, (x, w, dy), options)
        calls[name] = _waiting(exe, (x, w, dy))
    return Variant("jax", formulation, calls, compile_s, {"compiler_options": options})


def torch_conv_variant(mode: str, shape: ConvShape, x_np, w_np, dy_np) -> Variant:
    """conv2d forward and convolution_backward (dx or dw alone) on the same numbers, NCHW / OIHW."""
    import torch
    import torch.nn.functional as F

    (ph0, ph1), (pw0, pw1) = shape.padding
    if ph0 != ph1 or pw0 != pw1:
        raise NotImplementedError(f"torch.conv2d takes symmetric padding; this convolution has {shape.padding}")
    fmt = torch.channels_last if mode == "channels_last" else torch.contiguous_format
    x = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy()).contiguous(memory_format=fmt)
    w = torch.from_numpy(w_np.transpose(3, 2, 0, 1).copy()).contiguous(memory_format=fmt)
    dy = torch.from_numpy(dy_np.transpose(0, 3, 1, 2).copy()).contiguous(memory_format=fmt)
    stride, padding = list(shape.strides), [ph0, pw0]

    def backward(mask):
        return torch.ops.aten.convolution_backward(dy, x, w, None, stride, padding, [1, 1], False, [0, 0], 1, mask)

    @torch.no_grad()
    def forward():
        return F.conv2d(x, w, None, stride, padding)

    @torch.no_grad()
    def dx():
        return backward([True, False, False])[0]

    @torch.no_grad()
    def dw():
        return backward([False, True, False])[1]

    return Variant("torch", mode, {"forward": forward, "dx": dx, "dw": dw}, {}, {})


def jax_bn_variant(shape: BNShape, x, dy) -> Variant:
    """nnx.BatchNorm (hier_jax.models.layers' settings, train mode) + ReLU: forward (with the running
    statistics' update) and the VJP alone (residuals computed beforehand)."""
    import jax
    from flax import nnx

    from hier_jax.models import layers, xla_cpu

    options = xla_cpu.XLA_CPU_COMPILER_OPTIONS
    bn = layers.batch_norm(shape.x_shape[-1], nnx.Rngs(0))
    graphdef, params, stats = nnx.split(bn, nnx.Param, nnx.BatchStat)
    params, stats = jax.device_put((params, stats), host_cpu())

    def forward(params, stats, x):
        module = nnx.merge(graphdef, params, stats)
        y = nnx.relu(module(x, use_running_average=False))
        return y, nnx.state(module, nnx.BatchStat)

    # The statistics are a primal too (nnx refuses to update them from a trace they were not passed
    # into); their cotangent is zeros and is not compared.
    _, vjp = jax.vjp(lambda p, s, x: forward(p, s, x)[0], params, stats, x)
    fwd_exe, fwd_s = compiled(forward, (params, stats, x), options)
    bwd_exe, bwd_s = compiled(lambda vjp, dy: vjp(dy), (vjp, dy), options)
    calls = {"forward": _waiting(fwd_exe, (params, stats, x)), "backward": _waiting(bwd_exe, (vjp, dy))}
    return Variant("jax", BN_VARIANT, calls, {"forward": fwd_s, "backward": bwd_s}, {"compiler_options": options})


def torch_bn_variant(mode: str, shape: BNShape, x_np, dy_np) -> Variant:
    import torch
    import torch.nn.functional as F

    fmt = torch.channels_last if mode == "channels_last" else torch.contiguous_format
    bn = torch.nn.BatchNorm2d(shape.x_shape[-1], eps=1e-5, momentum=0.1).train()
    x = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy()).contiguous(memory_format=fmt)
    dy = torch.from_numpy(dy_np.transpose(0, 3, 1, 2).copy()).contiguous(memory_format=fmt)
    x_grad = x.detach().requires_grad_(True)
    y = F.relu(bn(x_grad))  # one graph, its backward run again on every call

    @torch.no_grad()
    def forward():
        return F.relu(bn(x))

    def backward():
        return torch.autograd.grad(y, (x_grad, bn.weight, bn.bias), dy, retain_graph=True)

    return Variant("torch", mode, {"forward": forward, "backward": backward}, {}, {})


def _nhwc(value) -> np.ndarray:
    """A result as a NumPy array in the JAX layout (torch NCHW -> NHWC, OIHW -> HWIO, (C,) as is)."""
    if hasattr(value, "detach"):
        value = value.detach().numpy()
        if value.ndim == 4:
            return value.transpose(0, 2, 3, 1)
        return value
    return np.asarray(value)


def _torch_kernel(value) -> np.ndarray:
    return value.detach().numpy().transpose(2, 3, 1, 0)  # OIHW -> HWIO


def result_arrays(op: str, step: str, framework: str, result) -> list[np.ndarray]:
    """A call's result as NumPy arrays comparable across frameworks."""
    if framework == "torch":
        if op == "conv":
            return [_torch_kernel(result) if step == "dw" else _nhwc(result)]
        if step == "forward":
            return [_nhwc(result)]
        dx, dscale, dbias = result
        return [_nhwc(dx), _nhwc(dscale), _nhwc(dbias)]
    if op == "bn":
        if step == "forward":
            return [np.asarray(result[0])]
        dparams, _, dx = result
        return [np.asarray(dx), np.asarray(dparams["scale"][...]), np.asarray(dparams["bias"][...])]
    return [np.asarray(result)]


def compare(got: list[np.ndarray], want: list[np.ndarray]) -> tuple[bool, float]:
    """(within rtol RTOL and atol RTOL * max|want| for every array, the largest max|got-want| / max|want|)."""
    ok, worst = True, 0.0
    for g, w in zip(got, want, strict=True):
        scale = float(np.max(np.abs(w))) if w.size else 0.0
        if g.shape != w.shape:
            return False, math.inf
        ok = ok and bool(np.allclose(g, w, rtol=RTOL, atol=RTOL * scale))
        err = float(np.max(np.abs(g - w))) if w.size else 0.0
        worst = max(worst, err / scale if scale else (0.0 if err == 0 else math.inf))
    return ok, worst


def conv_reference(shape: ConvShape, x, w, dy) -> dict[str, list[np.ndarray]]:
    """lax.conv_general_dilated's forward, dx and dw (the "eigen" program) on the arrays given."""
    variant = jax_conv_variant("eigen", shape, x, w, dy)
    return {step: result_arrays("conv", step, "jax", fn()) for step, fn in variant.fns.items()}


def time_op(op: str, shape, variants: list[Variant], reference: dict[str, list[np.ndarray]] | None, args) -> list[dict]:
    """Rows for every pass of one shape: check each variant once, then interleaved timings."""
    base = {"op": op, "layers": list(shape.layers), "x_shape": list(shape.x_shape)}
    if op == "conv":
        base.update(
            w_shape=list(shape.w_shape),
            y_shape=list(shape.y_shape),
            strides=list(shape.strides),
            padding=[list(p) for p in shape.padding],
        )
    else:
        base.update(w_shape=None, y_shape=list(shape.x_shape), strides=None, padding=None)
    rows = []
    for step in PASSES[op]:
        checks = {}
        want = reference[step] if reference is not None else None
        for v in variants:
            got = result_arrays(op, step, v.framework, v.fns[step]())
            if want is None:  # bn: the first variant (JAX's when timed) is the reference
                want = got
            checks[(v.framework, v.mode)] = compare(got, want)
        times = measure(variants, step, args.warmup, args.repeats)
        for v in variants:
            ts = times[(v.framework, v.mode)]
            median = statistics.median(ts)
            matches, err = checks[(v.framework, v.mode)]
            rows.append(
                {
                    **base,
                    "pass": step,
                    "framework": v.framework,
                    "variant": v.mode,
                    "median_s": median,
                    "min_s": min(ts),
                    "max_s": max(ts),
                    "gflops": shape.flops / median / 1e9 if op == "conv" else None,
                    "matches_lax": matches,
                    "max_rel_err": err,
                    "compile_s": v.compile_s.get(step),
                }
            )
    return rows


def inputs(shape_x: tuple[int, ...], shape_w: tuple[int, ...] | None, shape_y: tuple[int, ...], seed: int):
    """Random float32 x, w (He-scaled) and dy in the JAX layouts, as NumPy arrays."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape_x, dtype=np.float32)
    w = None
    if shape_w is not None:
        fan_in = math.prod(shape_w[:3])
        w = rng.standard_normal(shape_w, dtype=np.float32) * np.float32(math.sqrt(2.0 / fan_in))
    dy = rng.standard_normal(shape_y, dtype=np.float32)
    return x, w, dy


def run_conv(shape: ConvShape, args) -> list[dict]:
    import jax

    x_np, w_np, dy_np = inputs(shape.x_shape, shape.w_shape, shape.y_shape, args.seed)
    x, w, dy = (jax.device_put(a, host_cpu()) for a in (x_np, w_np, dy_np))
    variants = [jax_conv_variant(f, shape, x, w, dy) for f in args.formulations]
    eigen = next((v for v in variants if v.mode == "eigen"), None)
    reference = (
        {step: result_arrays("conv", step, "jax", fn()) for step, fn in eigen.fns.items()}
        if eigen is not None
        else conv_reference(shape, x, w, dy)
    )
    variants += [torch_conv_variant(m, shape, x_np, w_np, dy_np) for m in args.torch_modes]
    return time_op("conv", shape, variants, reference, args)


def run_bn(shape: BNShape, args) -> list[dict]:
    import jax

    x_np, _, dy_np = inputs(shape.x_shape, None, shape.x_shape, args.seed)
    x, dy = jax.device_put(x_np, host_cpu()), jax.device_put(dy_np, host_cpu())
    jax_variant = jax_bn_variant(shape, x, dy)
    variants = [jax_variant] + [torch_bn_variant(m, shape, x_np, dy_np) for m in args.torch_modes]
    reference = {step: result_arrays("bn", step, "jax", fn()) for step, fn in jax_variant.fns.items()}
    return time_op("bn", shape, variants, reference, args)


def run(todo: list[tuple[str, ConvShape | BNShape]], args) -> list[dict]:
    """Every row of every (op, shape) in `todo`, with one progress line per shape."""
    rows: list[dict] = []
    for index, (op, shape) in enumerate(todo, start=1):
        start = time.perf_counter()
        if op == "conv":
            assert isinstance(shape, ConvShape)
            done = run_conv(shape, args)
        else:
            assert isinstance(shape, BNShape)
            done = run_bn(shape, args)
        rows += done
        bad = [f"{r['pass']} {r['framework']} {r['variant']}" for r in done if not r["matches_lax"]]
        print(
            f"[{index}/{len(todo)}] {op} {shape.describe()} ({layers_text(shape.layers)}): "
            f"{time.perf_counter() - start:.1f} s{'; MISMATCH: ' + ', '.join(bad) if bad else ''}",
            flush=True,
        )
    return rows


def host_cpu():
    import jax

    return jax.devices("cpu")[0]
