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
import ctypes
import importlib.util
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from hier_jax import cli, outputs, process

DATASETS = {"cifar10": ((32, 32, 3), 10), "tiny_imagenet": ((64, 64, 3), 200)}
DEFAULT_SPLIT = {"vgg16": "pool3", "resnet18": "layer2_1", "resnet18_tv": "layer2_1"}
STEPS = ("edge", "cloud", "pair", "end_to_end")
TORCH_MODES = ("eager", "eager_cl", "compile")
JAX_VARIANTS = ("jit", "plain", "ynn", "eigen_xla")
PRECISIONS = ("fp32", "tf32", "bf16")  # hier_jax.precision's policies, less "auto": a benchmark names one


def tune_malloc() -> bool:
    """Keep freed memory in the process (glibc): no mmap for large blocks, no trimming of the heap,
    and one arena, so that threads started later allocate from the heap that is never trimmed."""
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
        return (
            bool(libc.mallopt(m_mmap_max, 0))
            and bool(libc.mallopt(m_trim_threshold, -1))
            and bool(libc.mallopt(m_arena_max, 1))
        )
    except OSError:
        return False


def arguments(argv: list[str] | None) -> argparse.Namespace:
    """The parsed and checked arguments; UserError naming the flag, the value and what is valid.

    Every argument is checked here, before any model is built or any framework is set up.
    """
    parser = cli.Parser(description=__doc__)
    parser.add_argument("--model", required=True, choices=sorted(DEFAULT_SPLIT))
    parser.add_argument(
        "--dataset",
        default="cifar10",
        choices=sorted(DATASETS),
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


class Variant:
    """One (framework, mode): a callable per step kind, each running one step and waiting for it."""

    def __init__(
        self,
        framework: str,
        mode: str,
        fns: dict[str, Callable[[], Any]],
        compile_s: dict[str, float],
        info: dict[str, Any],
    ):
        self.framework, self.mode, self.fns, self.compile_s, self.info = framework, mode, fns, compile_s, info


def jax_setting(variant: str) -> tuple[str, dict | None]:
    """(hier_jax.models.xla_cpu formulation, XLA compiler options) of a JAX variant."""
    import jax

    from hier_jax.models import xla_cpu

    if jax.default_backend() != "cpu":
        return ("auto", None) if variant == "jit" else ("xla", None)
    stock = xla_cpu.XLA_CPU_DEFAULT_COMPILER_OPTIONS  # explicit: process.setup() changes the process default
    return {
        "jit": ("cpu", xla_cpu.XLA_CPU_COMPILER_OPTIONS),
        "plain": ("xla", stock),
        "ynn": ("cpu-ynn", stock),
        "eigen_xla": ("xla", xla_cpu.XLA_CPU_COMPILER_OPTIONS),
    }[variant]


def model_and_split(args, shapes, conv_impl: str | None = None):
    """The hier-jax model and its split that every variant starts from (same seed: same weights),
    computing in the --precision policy (the weights are float32 in every policy)."""
    from hier_jax.models import ExitHeadConfig, build_model, split

    input_shape, num_classes = shapes
    model = build_model(
        args.model,
        num_classes=num_classes,
        input_shape=input_shape,
        width=args.width,
        seed=args.seed,
        conv_impl=conv_impl,
        precision=args.precision,
    )
    return model, split(model, args.split, ExitHeadConfig(channels=args.exit_channels), seed=args.seed)


def jax_variant(args, variant: str, shapes) -> Variant:
    import jax
    import jax.numpy as jnp

    from hier_jax import devices, optim, steps

    input_shape, num_classes = shapes
    conv, options = jax_setting(variant)
    model, parts = model_and_split(args, shapes, conv)
    tx = optim.make_optimizer(optim.OptimConfig(), total_steps=10_000)
    device = jax.devices()[0]
    put = lambda tree: devices.place(tree, device)  # noqa: E731 - copies: states are donated
    e_graphdef, e_state = steps.init_state(parts.edge, tx)
    c_graphdef, c_state = steps.init_state(parts.cloud, tx)
    f_graphdef, f_state = steps.init_state(model, tx)
    state = {"edge": put(e_state), "cloud": put(c_state), "full": put(f_state)}
    key_x, key_y = jax.random.split(jax.random.key(args.seed))
    x = jax.device_put(jax.random.normal(key_x, (args.batch, *input_shape), jnp.float32), device)
    y = jax.device_put(jax.random.randint(key_y, (args.batch,), 0, num_classes), device)

    compile_s: dict[str, float] = {}

    def compiled(name, fn, *example):
        start = time.perf_counter()
        exe = jax.jit(fn, donate_argnums=0).lower(*example).compile(compiler_options=options)
        compile_s[name] = time.perf_counter() - start
        return exe

    policy = model.precision  # traced under the policy's matmul precision, as hier_jax.run.threads does
    edge_fn = steps.make_edge_step(e_graphdef, tx, bits=args.bits, num_classes=num_classes, precision=policy)
    edge = compiled("edge", edge_fn, state["edge"], x, y)
    payload = jax.eval_shape(edge_fn, state["edge"], x, y)[1]
    cloud = compiled("cloud", steps.make_cloud_step(c_graphdef, tx, precision=policy), state["cloud"], payload)
    full = compiled("end_to_end", steps.make_train_step(f_graphdef, tx, precision=policy), state["full"], x, y)
    compile_s["pair"] = compile_s["edge"] + compile_s["cloud"]
    # One edge step's real payload for the cloud-only timings.
    state["edge"], payload, _ = jax.block_until_ready(edge(state["edge"], x, y))

    def run_edge():
        state["edge"], p, m = edge(state["edge"], x, y)
        jax.block_until_ready((state["edge"], p, m))

    def run_cloud():
        state["cloud"], m = cloud(state["cloud"], payload)
        jax.block_until_ready((state["cloud"], m))

    def run_pair():
        state["edge"], p, m_edge = edge(state["edge"], x, y)
        state["cloud"], m_cloud = cloud(state["cloud"], p)
        jax.block_until_ready((state["edge"], state["cloud"], m_edge, m_cloud))

    def run_full():
        state["full"], m = full(state["full"], x, y)
        jax.block_until_ready((state["full"], m))

    fns = {"edge": run_edge, "cloud": run_cloud, "pair": run_pair, "end_to_end": run_full}
    info = {
        "device": f"{device.platform}:{device.id} ({device.device_kind})",
        "conv_impl": model.conv_impl,
        "compiler_options": options,
        "payload_bytes": int(payload.nbytes),
        "jax_version": jax.__version__,
    }
    return Variant("jax", variant, fns, compile_s, info)


def torch_variant(args, mode: str, shapes) -> Variant:
    import torch

    from hier_jax import torch_ref as tr
    from hier_jax.optim import OptimConfig

    input_shape, num_classes = shapes
    cuda = _use_cuda()
    device = torch.device("cuda" if cuda else "cpu")
    memory_format = torch.contiguous_format if mode == "eager" else torch.channels_last
    compile = mode == "compile"
    # The same architecture and weights as the JAX side (built there, ported here).
    model, parts = model_and_split(args, shapes)
    t_model, t_parts = tr.torch_split_like(parts, model)
    for module in (t_model, t_parts.edge, t_parts.cloud):
        module.to(device=device, memory_format=memory_format).train()
    config = OptimConfig()
    e_opt, e_sched = tr.make_optimizer(t_parts.edge, config, 10_000, tensor_lr=compile)
    c_opt, c_sched = tr.make_optimizer(t_parts.cloud, config, 10_000, tensor_lr=compile)
    f_opt, f_sched = tr.make_optimizer(t_model, config, 10_000, tensor_lr=compile)
    autocast = torch.bfloat16 if args.precision == "bf16" else None
    edge = tr.EdgeStep(
        t_parts.edge,
        e_opt,
        e_sched,
        bits=args.bits,
        num_classes=num_classes,
        feature_shape=t_parts.feature_shape,
        compile=compile,
        autocast=autocast,
    )
    cloud = tr.CloudStep(
        t_parts.cloud,
        c_opt,
        c_sched,
        compile=compile,
        channels_last=memory_format == torch.channels_last,
        autocast=autocast,
    )
    full = tr.TrainStep(t_model, f_opt, f_sched, compile=compile, autocast=autocast)
    gen = torch.Generator().manual_seed(args.seed)
    h, w, c = input_shape
    x = torch.randn(args.batch, c, h, w, generator=gen).to(device=device, memory_format=memory_format)
    y = torch.randint(0, num_classes, (args.batch,), generator=gen).to(device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    compile_s: dict[str, float] = {}

    def first_call(name, fn):
        start = time.perf_counter()
        out = fn()
        sync()
        compile_s[name] = time.perf_counter() - start
        return out

    payload, _ = first_call("edge", lambda: edge(x, y))
    first_call("cloud", lambda: cloud(payload))
    first_call("end_to_end", lambda: full(x, y))
    compile_s["pair"] = compile_s["edge"] + compile_s["cloud"]

    def run_edge():
        edge(x, y)
        sync()

    def run_cloud():
        cloud(payload)
        sync()

    def run_pair():
        p, _ = edge(x, y)
        cloud(p)
        sync()

    def run_full():
        full(x, y)
        sync()

    fns = {"edge": run_edge, "cloud": run_cloud, "pair": run_pair, "end_to_end": run_full}
    info = {
        "device": str(device),
        "memory_format": "channels_last" if memory_format == torch.channels_last else "contiguous",
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    if not compile:
        compile_s = {}  # eager: first-call times are not compile times
    return Variant("torch", mode, fns, compile_s, info)


def _use_cuda() -> bool:
    import jax
    import torch

    return jax.default_backend() == "gpu" and torch.cuda.is_available()


def set_precision(policy: str = "fp32") -> str:
    """PyTorch's TF32 switches for `policy` (one of PRECISIONS: TF32 on for "tf32" only); returns the
    policy of both frameworks in words. JAX needs no global setting: the models are built in the
    policy and the steps traced under it (hier_jax.precision)."""
    import jax

    from hier_jax.precision import resolve

    backend = jax.default_backend()
    words = {
        "fp32": "float32; jax matmul precision 'highest'",
        "tf32": "float32 storage, TF32 matmuls and convolutions; jax matmul precision 'tensorfloat32'",
        "bf16": "bfloat16 activations, matmuls and convolutions, float32 parameters, accumulation and loss; "
        "jax models built in bf16, torch.autocast(bfloat16) around forward and loss",
    }[resolve(policy).name]
    if backend != "gpu":
        words += {
            "fp32": f" ({backend}: no reduced-precision matmul mode exists)",
            "tf32": f" ({backend}: neither framework has TF32, so this is fp32)",
            "bf16": "",
        }[policy]
    try:
        import torch
    except ImportError:
        return words
    tf32 = policy == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    return words + f"; torch allow_tf32={tf32} (matmul and cuDNN)"


def measure(variants: list[Variant], step: str, warmup: int, rounds: int) -> dict[tuple[str, str], list[float]]:
    for v in variants:
        for _ in range(warmup):
            v.fns[step]()
    times: dict[tuple[str, str], list[float]] = {(v.framework, v.mode): [] for v in variants}
    for _ in range(rounds):
        for v in variants:
            start = time.perf_counter()
            v.fns[step]()
            times[(v.framework, v.mode)].append(time.perf_counter() - start)
    return times


@cli.entry_point
def main(argv: list[str]) -> list[dict]:
    process.setup()
    args = arguments(argv)
    out = outputs.prepare_run_dir(args.out, outputs=()) if args.out else None
    malloc_tuned = False if args.no_malloc_tuning else tune_malloc()
    from hier_jax.models import MODELS  # noqa: F401 - fail early on a broken install

    args.split = args.split or DEFAULT_SPLIT[args.model]
    shapes = DATASETS[args.dataset]
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


def print_table(rows: list[dict]) -> None:
    """One block per step: every variant, and JAX's median over each PyTorch variant's median."""
    torch_rows = [r for r in rows if r["framework"] == "torch"]
    for r in rows:
        compile_s = f"{r['compile_s']:7.1f}" if r.get("compile_s") is not None else "      -"
        ratios = ""
        if r["framework"] == "jax" and torch_rows:
            ratios = "  " + "  ".join(f"{r['median_s'] / t['median_s']:5.2f}x {t['mode']}" for t in torch_rows)
        print(
            f"{r['model']:11s} {r['step']:10s} {r['framework']:5s} {r['mode']:14s} median {r['median_s']:8.3f} s"
            f"  min {r['min_s']:7.3f}  max {r['max_s']:7.3f}  compile {compile_s} s{ratios}",
            flush=True,
        )


if __name__ == "__main__":
    main()
