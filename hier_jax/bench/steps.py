"""The train steps bench_torch times: JAX's (the library's own, jitted and compiled ahead) and PyTorch's
(torch_ref, eager and compiled), at one precision policy on one device."""

from __future__ import annotations

import time

from hier_jax.bench.timing import Variant

DEFAULT_SPLIT = {"vgg16": "pool3", "resnet18": "layer2_1", "resnet18_tv": "layer2_1"}
STEPS = ("edge", "cloud", "pair", "end_to_end")
TORCH_MODES = ("eager", "eager_cl", "compile")
JAX_VARIANTS = ("jit", "plain", "ynn", "eigen_xla")
PRECISIONS = ("fp32", "tf32", "bf16")  # hier_jax.precision's policies, less "auto": a benchmark names one


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
        module.to(device=device, memory_format=memory_format).train()  # pyright: ignore[reportCallIssue] - torch's overloads omit memory_format
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
