"""bench_layers' record: the environment it was measured in, and its Markdown table (one per op and pass,
the fastest JAX variant over the fastest PyTorch one)."""

from __future__ import annotations

import os

from hier_jax.bench.layers import OPS, PASSES, RTOL
from hier_jax.bench.shapes import INPUT_SHAPE, layers_text


def jax_version() -> str:
    import jax

    return jax.__version__


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
                layers = layers_text(next(iter(by_variant.values()))["layers"])
                lines.append(
                    f"| {text} | {layers} | "
                    + " | ".join(cells)
                    + f" | {best_jax['variant'] if best_jax else '-'} | {ratio} |"
                )
    return "\n".join(lines) + "\n"


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
        "jaxlib": jaxlib.__version__,  # pyright: ignore[reportPrivateImportUsage] - jaxlib does not re-export it
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
