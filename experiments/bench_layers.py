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
import importlib.util

from hier_jax import cli, outputs, process
from hier_jax.bench.layers import DEFAULT_MODELS, FORMULATIONS, OPS, TORCH_MODES, run
from hier_jax.bench.layers_report import environment, jax_version, table
from hier_jax.bench.shapes import collect_shapes
from hier_jax.bench.timing import tune_malloc

OUTPUTS = ("bench_layers.json", "bench_layers.md")


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


parse_args = cli.entry_point(arguments)
"""`arguments` with the command line's conventions: a bad argument prints one line and raises SystemExit(2)."""


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
