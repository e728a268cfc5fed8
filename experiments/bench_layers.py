"""Per-op benchmark of JAX against PyTorch on the CPU: every convolution and BatchNorm of the backbones.

hier_jax.models.xla_cpu picks, per convolution shape and pass, which formulation the CPU runs (Eigen
or YNNPACK, dense / pointwise / polyphase / im2col rewrites); this is the record those choices rest
on. XLA:CPU's convolution paths change between jaxlib releases, so rerun it when jaxlib (or the CPU)
changes and compare with the last record (docs/speed.md):

    python -m experiments.bench_layers --models vgg16,resnet18 --batch 128 --width 64 --repeats 5 \\
        --out docs/results/bench_layers

    python -m experiments.bench_layers [--models vgg16,resnet18] [--batch 128] [--width 64] [--repeats 5]
        [--warmup 2] [--formulations eigen,ynnpack,cpu,cpu-ynn] [--torch-modes channels_last,nchw]
        [--ops conv,bn] [--shapes-limit K] [--overwrite] --out DIR

What is measured, on CIFAR-10 shapes (32x32x3 images, 10 classes):
- conv: every distinct convolution of the models (input shape, HWIO kernel, strides, padding; read
  from a trace of each stage's train-mode forward, which layers use it is recorded as model:stage,
  once per convolution). Three passes per shape: the forward, the input gradient (dx) and the weight
  gradient (dw), each a jitted function of (x, w, dy) built with jax.vjp. JAX formulations:
    eigen     lax.conv_general_dilated, compiled with xla_cpu.XLA_CPU_COMPILER_OPTIONS (Eigen)
    ynnpack   lax.conv_general_dilated, compiled with XLA_CPU_DEFAULT_COMPILER_OPTIONS (jaxlib's stock
              YNNPACK convolutions)
    cpu       xla_cpu.conv_general_dilated(impl="cpu"), the project's CPU path, with the Eigen options
    cpu-ynn   impl="cpu-ynn" (im2col weight gradient included), with the stock options
  PyTorch (--torch-modes): torch.nn.functional.conv2d forward and aten.convolution_backward with an
  output mask for dx or dw alone, on channels_last ("channels_last") or contiguous NCHW ("nchw")
  tensors holding the same numbers.
- bn: BatchNorm in train mode (batch statistics, running statistics updated) then ReLU, for every
  distinct shape a BatchNorm normalises (the output of each convolution: every convolution of both
  backbones feeds one). JAX ("nnx"): nnx.BatchNorm with hier_jax.models.layers' settings, NHWC,
  Eigen options. "forward" is the layer's forward; "backward" its gradient alone (JAX: the jitted
  VJP from jax.vjp, whose residuals were computed beforehand; PyTorch: torch.autograd.grad of one
  retained graph) with respect to the input, the scale and the bias. PyTorch: nn.BatchNorm2d(eps
  1e-5, momentum 0.1) and F.relu.

Every variant of one (shape, pass) is compiled and called once (its result checked, below), runs
--warmup untimed calls, then the variants take turns for --repeats rounds (interleaved, as in
experiments.bench_torch, whose helpers this reuses); every call is waited for (block_until_ready).
Median, min and max seconds per call; for convolutions also GFLOP/s, 2*B*Ho*Wo*Cout*Cin*kh*kw over
the median, the same nominal count for all three passes (the dense formulation multiplies by zeros
too, which is not counted). PyTorch gets torch.set_num_threads(cores this process may run on); XLA
uses all of them. Host allocator: tune_malloc as in bench_torch unless --no-malloc-tuning. float32
throughout; the arrays live on the host CPU device whatever JAX's default backend is. Time it with
nothing else running and --repeats 5 or more: with 2 rounds on a busy 2-core host single figures
move by 2x and more.

Correctness (`matches_lax`, once per shape, pass and variant): for conv rows, whether the result
equals lax.conv_general_dilated's (the "eigen" program) within rtol 1e-4, with an absolute tolerance
of 1e-4 times the reference's largest magnitude (weight-gradient entries near zero carry round-off
of sums as large as the biggest entry); `max_rel_err` is max|result - reference| / max|reference|.
For bn rows the reference is the JAX nnx.BatchNorm result (output; gradients of input, scale, bias).

Writes DIR/bench_layers.json: {"cpu_model", "jax", "jaxlib", "torch", "threads", "batch", "width",
..., "rows": [{"op", "layers", "x_shape", "w_shape", "y_shape", "strides", "padding", "pass",
"framework", "variant", "median_s", "min_s", "max_s", "gflops", "matches_lax", "max_rel_err",
"compile_s"}, ...]}, and DIR/bench_layers.md: one table per op and pass, one line per shape, each
variant's median in ms (marked "!" where its result does not match), the fastest JAX variant and
its median over PyTorch's fastest (below 1: JAX is faster). An existing DIR/bench_layers.json is
kept unless --overwrite. A full run (both models at batch 128) takes a long while on a small CPU;
one progress line per shape is printed.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib.util
import math
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from experiments.bench_torch import Variant, measure, tune_malloc
from hier_jax import cli, outputs, process

INPUT_SHAPE, NUM_CLASSES = (32, 32, 3), 10  # CIFAR-10
DEFAULT_MODELS = ("vgg16", "resnet18")
FORMULATIONS = ("eigen", "ynnpack", "cpu", "cpu-ynn")
TORCH_MODES = ("channels_last", "nchw")
OPS = ("conv", "bn")
PASSES = {"conv": ("forward", "dx", "dw"), "bn": ("forward", "backward")}
BN_VARIANT = "nnx"
RTOL = 1e-4
OUTPUTS = ("bench_layers.json", "bench_layers.md")
_DN = ("NHWC", "HWIO", "NHWC")


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def arguments(argv: list[str] | None) -> argparse.Namespace:
    """The parsed and checked arguments; UserError naming the flag, the value and what is valid.
    Everything is checked here, before any model is built or any output written."""
    from hier_jax.models import MODELS

    parser = cli.Parser(description=__doc__)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"subset of {','.join(MODELS)}")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--width", type=int, default=64, help="channels of the first layer (64: full size)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per op")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per variant first")
    parser.add_argument(
        "--formulations",
        default=",".join(FORMULATIONS),
        help=f"JAX convolution formulations, subset of {','.join(FORMULATIONS)}",
    )
    parser.add_argument(
        "--torch-modes", default=",".join(TORCH_MODES), help=f"subset of {','.join(TORCH_MODES)} (empty: JAX only)"
    )
    parser.add_argument("--ops", default=",".join(OPS), help=f"subset of {','.join(OPS)}")
    parser.add_argument("--shapes-limit", type=int, default=None, help="time only the first K shapes of each op")
    parser.add_argument("--no-malloc-tuning", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace a bench_layers.json already in --out")
    parser.add_argument("--out", required=True, help="write OUT/bench_layers.json and OUT/bench_layers.md")
    args = parser.parse_args(argv)
    args.models, args.formulations = _csv(args.models), _csv(args.formulations)
    args.torch_modes, args.ops = _csv(args.torch_modes), _csv(args.ops)
    for flag, values, valid in [
        ("--models", args.models, tuple(MODELS)),
        ("--formulations", args.formulations, FORMULATIONS),
        ("--torch-modes", args.torch_modes, TORCH_MODES),
        ("--ops", args.ops, OPS),
    ]:
        bad = [v for v in values if v not in valid]
        if bad:
            parser.error(f"{flag}: unknown {', '.join(map(repr, bad))}; valid: {', '.join(valid)}")
    for flag, values, valid in [("--models", args.models, tuple(MODELS)), ("--ops", args.ops, OPS)]:
        if not values:
            parser.error(f"{flag} is empty; valid: a comma-separated subset of {','.join(valid)}")
    if not args.formulations and not args.torch_modes:
        parser.error("--formulations and --torch-modes are both empty: nothing to time")
    for flag, value, least in [
        ("--batch", args.batch, 1),
        ("--width", args.width, 1),
        ("--repeats", args.repeats, 1),
        ("--warmup", args.warmup, 0),
        ("--seed", args.seed, 0),
        ("--shapes-limit", 1 if args.shapes_limit is None else args.shapes_limit, 1),
    ]:
        if value < least:
            parser.error(f"{flag} {value} is invalid; valid: an integer >= {least}")
    from hier_jax.models import xla_cpu

    if tuple(int(v) for v in jax_version().split(".")[:2]) not in xla_cpu.FLAG_JAX_VERSIONS:
        parser.error(
            f"jax {jax_version()} has no xla_cpu_experimental_ynn_fusion_type option, through which "
            f"this benchmark picks XLA:CPU's convolution backend; update hier_jax.models.xla_cpu's "
            f"options (and FLAG_JAX_VERSIONS) for this jaxlib first"
        )
    if args.torch_modes and importlib.util.find_spec("torch") is None:
        parser.error(
            f"--torch-modes {','.join(args.torch_modes)} needs PyTorch, which is not installed "
            f"(pip install -e .[torch]); --torch-modes '' times JAX alone"
        )
    # Unique, in the order given.
    for name in ("models", "formulations", "torch_modes", "ops"):
        setattr(args, name, list(dict.fromkeys(getattr(args, name))))
    return args


def jax_version() -> str:
    import jax

    return jax.__version__


parse_args = cli.entry_point(arguments)
"""`arguments` with the command line's conventions: a bad argument prints one line and raises SystemExit(2)."""


# ---------------------------------------------------------------------------------------------- shapes


@dataclasses.dataclass
class ConvShape:
    x_shape: tuple[int, ...]
    w_shape: tuple[int, ...]  # HWIO
    strides: tuple[int, int]
    padding: tuple[tuple[int, int], tuple[int, int]]
    y_shape: tuple[int, ...]
    layers: list[str] = dataclasses.field(default_factory=list)

    @property
    def key(self) -> tuple:
        return self.x_shape, self.w_shape, self.strides, self.padding

    @property
    def flops(self) -> int:
        """2*B*Ho*Wo*Cout*Cin*kh*kw: the nominal multiply-adds of the convolution, times two."""
        b, ho, wo, cout = self.y_shape
        kh, kw, cin, _ = self.w_shape
        return 2 * b * ho * wo * cout * cin * kh * kw

    def describe(self) -> str:
        kh, kw, cin, cout = self.w_shape
        pads = sorted({p for pad in self.padding for p in pad})
        return (
            f"{'x'.join(map(str, self.x_shape))} {kh}x{kw} {cin}->{cout} "
            f"s{'x'.join(map(str, sorted(set(self.strides))))} p{'/'.join(map(str, pads))}"
        )


@dataclasses.dataclass
class BNShape:
    x_shape: tuple[int, ...]
    layers: list[str] = dataclasses.field(default_factory=list)

    @property
    def key(self) -> tuple:
        return self.x_shape

    def describe(self) -> str:
        return "x".join(map(str, self.x_shape))


def _conv_eqns(jaxpr) -> list:
    """The conv_general_dilated equations of a jaxpr, sub-jaxprs (calls, custom rules) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            found.append(eqn)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found.extend(_conv_eqns(inner))
    return found


def _conv_shape(eqn) -> ConvShape:
    from jax import lax

    p = eqn.params
    dn = p["dimension_numbers"]
    nhwc = lax.conv_dimension_numbers((1,) * 4, (1,) * 4, _DN)
    if (
        (dn.lhs_spec, dn.rhs_spec, dn.out_spec) != (nhwc.lhs_spec, nhwc.rhs_spec, nhwc.out_spec)
        or p["feature_group_count"] != 1
        or p["batch_group_count"] != 1
        or any(d != 1 for d in (*p["lhs_dilation"], *p["rhs_dilation"]))
    ):
        raise NotImplementedError(
            f"bench_layers times NHWC/HWIO convolutions without dilation or groups; the model has {p}"
        )
    return ConvShape(
        tuple(eqn.invars[0].aval.shape),
        tuple(eqn.invars[1].aval.shape),
        tuple(int(s) for s in p["window_strides"]),
        tuple(tuple(int(v) for v in pad) for pad in p["padding"]),
        tuple(eqn.outvars[0].aval.shape),
    )


def collect_shapes(models: list[str], batch: int, width: int) -> tuple[list[ConvShape], list[BNShape]]:
    """Distinct convolution and BatchNorm shapes of the models' train-mode forward, in order of first
    use, each with the layers (model:stage, once per use) that use it. Traced abstractly (no arrays)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from hier_jax.models import build_model

    convs: dict[tuple, ConvShape] = {}
    bns: dict[tuple, BNShape] = {}
    for name in models:
        model = nnx.eval_shape(
            lambda name=name: build_model(
                name, num_classes=NUM_CLASSES, input_shape=INPUT_SHAPE, width=width, conv_impl="xla"
            )
        )
        x = jax.ShapeDtypeStruct((batch, *INPUT_SHAPE), jnp.float32)
        for stage_name, stage in zip(model.stage_names, model.stages, strict=True):
            graphdef, state = nnx.split(stage)
            jaxpr, x = jax.make_jaxpr(
                lambda state, x, graphdef=graphdef: nnx.merge(graphdef, state)(x, True), return_shape=True
            )(state, x)
            shapes = [_conv_shape(e) for e in _conv_eqns(jaxpr.jaxpr)]
            norms = [m for _, m in nnx.iter_graph(stage) if isinstance(m, nnx.BatchNorm)]
            if len(norms) != len(shapes) or sorted(n.num_features for n in norms) != sorted(
                s.w_shape[-1] for s in shapes
            ):
                raise NotImplementedError(
                    f"{name}:{stage_name}: bench_layers takes each BatchNorm's input to be a "
                    f"convolution's output; this stage has {len(shapes)} convolutions and "
                    f"{len(norms)} BatchNorms"
                )
            label = f"{name}:{stage_name}"
            for shape in shapes:
                convs.setdefault(shape.key, shape).layers.append(label)
                bns.setdefault(shape.y_shape, BNShape(shape.y_shape)).layers.append(label)
    return list(convs.values()), list(bns.values())


# ---------------------------------------------------------------------------------------------- variants


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
    if formulation in ("eigen", "ynnpack"):

        def conv(x, w):
            return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_DN)
    else:

        def conv(x, w):
            return xla_cpu.conv_general_dilated(x, w, strides, padding, dimension_numbers=_DN, impl=formulation)

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


# ---------------------------------------------------------------------------------------------- checks


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


# ---------------------------------------------------------------------------------------------- timing


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


def host_cpu():
    import jax

    return jax.devices("cpu")[0]


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


# ---------------------------------------------------------------------------------------------- report


def _layers_text(layers: list[str]) -> str:
    counts = collections.Counter(layers)
    return ", ".join(f"{name} x{n}" if n > 1 else name for name, n in counts.items())


def _shape_text(row: dict) -> str:
    x = "x".join(map(str, row["x_shape"]))
    if row["op"] != "conv":
        return x
    kh, kw, cin, cout = row["w_shape"]
    pads = sorted({p for pad in row["padding"] for p in pad})
    return f"{x} {kh}x{kw} {cin}->{cout} s{'x'.join(map(str, sorted(set(row['strides']))))} p{'/'.join(map(str, pads))}"


def table(rows: list[dict], header: dict) -> str:
    """Markdown: one table per op and pass, one line per shape, median ms per variant."""
    lines = [
        f"# bench_layers: {header['cpu_model']}, {header['threads']} threads",
        "",
        f"jax {header['jax']}, jaxlib {header['jaxlib']}, torch {header['torch'] or '-'}; "
        f"batch {header['batch']}, width {header['width']}, models {', '.join(header['models'])}; "
        f"median of {header['repeats']} interleaved calls, in ms "
        f"(`!`: result does not match lax within rtol {RTOL}). "
        f"`JAX/torch`: the fastest JAX variant's median over PyTorch's fastest (below 1: JAX faster).",
    ]
    for op in OPS:
        for step in PASSES[op]:
            subset = [r for r in rows if r["op"] == op and r["pass"] == step]
            if not subset:
                continue
            variants = list(dict.fromkeys((r["framework"], r["variant"]) for r in subset))
            names = [v if f == "jax" else f"torch {v}" for f, v in variants]
            lines += [
                "",
                f"## {op} {step}",
                "",
                "| shape | layers | " + " | ".join(names) + " | fastest JAX | JAX/torch |",
                "| --- | --- |" + " ---: |" * len(names) + " --- | ---: |",
            ]
            shapes = list(dict.fromkeys(_shape_text(r) for r in subset))
            for text in shapes:
                by_variant = {(r["framework"], r["variant"]): r for r in subset if _shape_text(r) == text}
                cells = []
                for key in variants:
                    r = by_variant.get(key)
                    cells.append("-" if r is None else f"{r['median_s'] * 1e3:.2f}{'' if r['matches_lax'] else ' !'}")
                jax_rows = [r for r in by_variant.values() if r["framework"] == "jax"]
                torch_rows = [r for r in by_variant.values() if r["framework"] == "torch"]
                best_jax = min(jax_rows, key=lambda r: r["median_s"]) if jax_rows else None
                best_torch = min(torch_rows, key=lambda r: r["median_s"]) if torch_rows else None
                ratio = (
                    f"{best_jax['median_s'] / best_torch['median_s']:.2f}"
                    if best_jax is not None and best_torch is not None
                    else "-"
                )
                layers = _layers_text(next(iter(by_variant.values()))["layers"])
                lines.append(
                    f"| {text} | {layers} | "
                    + " | ".join(cells)
                    + f" | {best_jax['variant'] if best_jax else '-'} | {ratio} |"
                )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- main


def environment(args, malloc_tuned: bool) -> dict:
    """The JSON's header: CPU, versions, threads (PyTorch's set to this process's cores) and settings."""
    import jax
    import jaxlib

    from hier_jax.runtime_model import profiler

    threads = len(os.sched_getaffinity(0))
    torch_version = torch_threads = None
    if args.torch_modes:
        import torch

        torch.set_num_threads(threads)
        torch_version, torch_threads = torch.__version__, torch.get_num_threads()
    return {
        "cpu_model": profiler.host_cpu(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "torch": torch_version,
        "threads": threads,
        "torch_threads": torch_threads,
        "batch": args.batch,
        "width": args.width,
        "models": args.models,
        "input_shape": list(INPUT_SHAPE),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "formulations": args.formulations,
        "torch_modes": args.torch_modes,
        "ops": args.ops,
        "malloc_tuned": malloc_tuned,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "rtol": RTOL,
    }


def run(todo: list[tuple[str, ConvShape | BNShape]], args) -> list[dict]:
    """Every row of every (op, shape) in `todo`, with one progress line per shape."""
    rows: list[dict] = []
    for index, (op, shape) in enumerate(todo, start=1):
        start = time.perf_counter()
        done = run_conv(shape, args) if op == "conv" else run_bn(shape, args)
        rows += done
        bad = [f"{r['pass']} {r['framework']} {r['variant']}" for r in done if not r["matches_lax"]]
        print(
            f"[{index}/{len(todo)}] {op} {shape.describe()} ({_layers_text(shape.layers)}): "
            f"{time.perf_counter() - start:.1f} s{'; MISMATCH: ' + ', '.join(bad) if bad else ''}",
            flush=True,
        )
    return rows


@cli.entry_point
def main(argv: list[str]) -> dict:
    process.setup()
    args = arguments(argv)
    out = outputs.prepare_run_dir(args.out, overwrite=args.overwrite, outputs=OUTPUTS)
    header = environment(args, False if args.no_malloc_tuning else tune_malloc())
    conv_shapes, bn_shapes = collect_shapes(args.models, args.batch, args.width)
    todo = ([("conv", s) for s in conv_shapes[: args.shapes_limit]] if "conv" in args.ops else []) + (
        [("bn", s) for s in bn_shapes[: args.shapes_limit]] if "bn" in args.ops else []
    )
    print(
        f"{header['cpu_model']}, {header['threads']} threads; {len(conv_shapes)} convolution and "
        f"{len(bn_shapes)} BatchNorm shapes in {', '.join(args.models)}; timing {len(todo)}",
        flush=True,
    )
    if args.overwrite:
        outputs.remove_run(out, OUTPUTS)
    result = {**header, "rows": run(todo, args)}
    text = table(result["rows"], header)
    print(text, end="")
    outputs.write_json(out / "bench_layers.json", result)
    outputs.write_atomic(out / "bench_layers.md", text)
    return result


if __name__ == "__main__":
    main()
