"""hier-jax against its PyTorch reference: the same train steps, timed on one device at one precision.

    python -m experiments.bench_torch --model resnet18|resnet18_tv|vgg16 --dataset cifar10|tiny_imagenet
        [--split POINT] [--batch 128] [--steps N] [--warmup W] [--bits B] [--width 64]
        [--torch-modes eager,eager_cl,compile] [--jax-variants jit] [--precision fp32|tf32|bf16] --out DIR

Steps (the paper's hierarchical scheme and its baseline):
  edge        edge forward + early-exit loss + backward + SGD update, payload encoded (hier_jax.steps
              .make_edge_step; torch_ref.EdgeStep)
  cloud       payload decoded + cloud forward + loss + backward + update (make_cloud_step; CloudStep)
  pair        one edge step then one cloud step on its payload, as one worker running both would
  end_to_end  the unsplit model's train step (make_train_step; TrainStep)

JAX: the library's real steps, jitted with the state donated (as hier_jax.run.threads does) and compiled
ahead with .lower().compile(); compile time is reported apart. JAX variants (--jax-variants):
  jit        the recommended setting: on CPU, hier_jax.models.xla_cpu's CPU formulation ("cpu")
             and XLA_CPU_COMPILER_OPTIONS (convolutions to Eigen, not YNNPACK); elsewhere plain jit
  plain      stock Flax: lax convolutions and pooling, jaxlib's default XLA:CPU options (the "before")
  ynn        the CPU path for XLA's default convolution backend ("cpu-ynn"), jaxlib's default options
  eigen_xla  lax convolutions and pooling with XLA_CPU_COMPILER_OPTIONS (the option alone)
PyTorch: torch_ref's steps in eager
mode (NCHW, "eager"; channels_last, "eager_cl") and under torch.compile (channels_last, "compile";
the first call's time, compilation included, is reported as its compile time). Each variant runs
`--warmup` untimed steps, then the variants take turns for `--steps` rounds (interleaved, so a
change in background load hits all of them alike); every step is waited for (block_until_ready /
cuda.synchronize). Median, min and max seconds per step.

Precision policy (--precision, like with like on both frameworks; float32 parameters and optimizer
state always):
  fp32 (default)  float32 activations and gradients: JAX steps traced at matmul precision "highest",
                  torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False.
  tf32            float32 storage, TF32 matmuls and convolutions: JAX "tensorfloat32", torch
                  allow_tf32 = True (matmul and cuDNN). Only GPUs have TF32: on CPU both frameworks
                  compute float32, the same as fp32.
  bf16            JAX models built with precision "bf16" (bfloat16 activations, matmuls and
                  convolutions, float32 accumulation and loss); PyTorch runs the forward pass and loss
                  under torch.autocast(device, torch.bfloat16) (torch_ref's steps, autocast=), TF32 off.
The JAX side takes the policy through hier_jax.precision (build_model and the steps' builders); the
process-wide jax_default_matmul_precision is left alone. Every row records it ("precision", and
"precision_detail" in words).

Host allocator (CPU): glibc malloc returns every block over 32 MiB to the OS on free, so each step
page-faults its large buffers in again (XLA's temporaries and PyTorch's tensors alike), which at
batch 128 costs a large share of the step on a small CPU. Unless --no-malloc-tuning, the benchmark
calls mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD=-1, M_ARENA_MAX=1) first, for both frameworks in this
process. The arena limit matters as much: a worker thread's own arena cannot hold a block over 64 MiB,
so glibc mmaps it whatever M_MMAP_MAX says (Eigen's convolution packing buffers, up to 302 MB, on
XLA's threads: 201,168 page faults per ResNet-18 edge step without the limit, none with it).

Writes DIR/bench_torch.json: a list of rows {model, dataset, split, batch, width, bits, step,
framework, mode, precision, precision_detail, median_s, min_s, max_s, steps, compile_s, device, ...}.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import sys
import time

from hier_jax import cli, outputs, process
from hier_jax.bench.steps import (
    DEFAULT_SPLIT,
    JAX_VARIANTS,
    PRECISIONS,
    STEPS,
    TORCH_MODES,
    jax_variant,
    print_table,
    set_precision,
    torch_variant,
)
from hier_jax.bench.timing import Variant, measure, tune_malloc
from hier_jax.data import STANDARD_SHAPES


def arguments(argv: list[str] | None) -> argparse.Namespace:
    """The parsed and checked arguments; UserError naming the flag, the value and what is valid.

    Every argument is checked here, before any model is built or any framework is set up.
    """
    parser = cli.Parser(description=__doc__)
    parser.add_argument("--model", required=True, choices=sorted(DEFAULT_SPLIT))
    parser.add_argument(
        "--dataset",
        default="cifar10",
        choices=sorted(STANDARD_SHAPES),
        help="sets the input shape and class count (inputs are random)",
    )
    parser.add_argument("--split", default=None, help="separation point (default: pool3 / layer2_1)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--bits", type=int, default=4, help="payload quantization (1-8, 16, 32)")
    parser.add_argument("--width", type=int, default=64, help="channels of the first layer (64: full size)")
    parser.add_argument("--exit-channels", type=int, default=128, help="exit head conv channels")
    parser.add_argument("--steps-to-time", default=",".join(STEPS), help=f"subset of {','.join(STEPS)}")
    parser.add_argument(
        "--torch-modes", default=",".join(TORCH_MODES), help=f"subset of {','.join(TORCH_MODES)} (empty: JAX only)"
    )
    parser.add_argument("--jax-variants", default="jit", help=f"subset of {','.join(JAX_VARIANTS)}")
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=PRECISIONS,
        help="precision policy of both frameworks (see above; default: %(default)s)",
    )
    parser.add_argument("--no-malloc-tuning", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write OUT/bench_torch.json")
    args = parser.parse_args(argv)
    args.steps_to_time = [s for s in args.steps_to_time.split(",") if s]
    args.torch_modes = [m for m in args.torch_modes.split(",") if m]
    args.jax_variants = [c for c in args.jax_variants.split(",") if c]
    for flag, values, valid in [
        ("--steps-to-time", args.steps_to_time, STEPS),
        ("--torch-modes", args.torch_modes, TORCH_MODES),
        ("--jax-variants", args.jax_variants, JAX_VARIANTS),
    ]:
        bad = [v for v in values if v not in valid]
        if bad:
            parser.error(f"{flag}: unknown {', '.join(map(repr, bad))}; valid: {', '.join(valid)}")
    if not args.steps_to_time:
        parser.error(f"--steps-to-time is empty; valid: a comma-separated subset of {','.join(STEPS)}")
    if not args.torch_modes and not args.jax_variants:
        parser.error("--torch-modes and --jax-variants are both empty: nothing to time")
    for flag, value, least in [
        ("--batch", args.batch, 1),
        ("--steps", args.steps, 1),
        ("--warmup", args.warmup, 0),
        ("--width", args.width, 1),
        ("--exit-channels", args.exit_channels, 1),
        ("--seed", args.seed, 0),
    ]:
        if value < least:
            parser.error(f"{flag} {value} is invalid; valid: an integer >= {least}")

    from hier_jax.models import stage_names
    from hier_jax.quantization import VALID_BITS

    args.split = args.split or DEFAULT_SPLIT[args.model]
    points = stage_names(args.model)
    if args.split not in points:
        parser.error(f"--split {args.split!r} is invalid; valid: a stage of {args.model}: {', '.join(points)}")
    if args.bits not in VALID_BITS:
        parser.error(f"--bits {args.bits} is invalid; valid: {', '.join(map(str, VALID_BITS))}")
    if args.torch_modes and importlib.util.find_spec("torch") is None:
        parser.error(
            f"--torch-modes {','.join(args.torch_modes)} needs PyTorch, which is not installed "
            f"(pip install -e .[torch]); --torch-modes '' times JAX alone"
        )
    return args


parse_args = cli.entry_point(arguments)
"""`arguments` with the command line's conventions: a bad argument prints one line and raises SystemExit(2)."""


@cli.entry_point
def main(argv: list[str]) -> list[dict]:
    process.setup()
    args = arguments(argv)
    out = outputs.prepare_run_dir(args.out, outputs=()) if args.out else None
    malloc_tuned = False if args.no_malloc_tuning else tune_malloc()
    from hier_jax.models import MODELS  # noqa: F401 - fail early on a broken install

    args.split = args.split or DEFAULT_SPLIT[args.model]
    shape = STANDARD_SHAPES[args.dataset]
    shapes = (shape.image_shape, shape.num_classes)
    precision = set_precision(args.precision)
    print(f"precision {args.precision}: {precision}", flush=True)
    variants: list[Variant] = []
    for variant in args.jax_variants:
        start = time.perf_counter()
        variants.append(jax_variant(args, variant, shapes))
        print(
            f"jax {variant}: ready in {time.perf_counter() - start:.1f} s, compiled in "
            f"{', '.join(f'{k} {v:.1f} s' for k, v in variants[-1].compile_s.items() if k != 'pair')}",
            flush=True,
        )
    for mode in args.torch_modes:
        start = time.perf_counter()
        variants.append(torch_variant(args, mode, shapes))
        print(f"torch {mode}: ready in {time.perf_counter() - start:.1f} s", flush=True)

    common = {
        "model": args.model,
        "dataset": args.dataset,
        "split": args.split,
        "batch": args.batch,
        "width": args.width,
        "bits": args.bits,
        "precision": args.precision,
        "precision_detail": precision,
        "malloc_tuned": malloc_tuned,
        "host": f"{platform.machine()} x{os.cpu_count()}",
        "python": sys.version.split()[0],
    }
    rows = []
    for step in args.steps_to_time:
        times = measure(variants, step, args.warmup, args.steps)
        for v in variants:
            ts = times[(v.framework, v.mode)]
            rows.append(
                {
                    **common,
                    "step": step,
                    "framework": v.framework,
                    "mode": v.mode,
                    "median_s": statistics.median(ts),
                    "min_s": min(ts),
                    "max_s": max(ts),
                    "steps": len(ts),
                    "compile_s": v.compile_s.get(step),
                    **v.info,
                }
            )
        print_table([r for r in rows if r["step"] == step])
    if out is not None:
        outputs.write_json(out / "bench_torch.json", rows)
    return rows


if __name__ == "__main__":
    main()
