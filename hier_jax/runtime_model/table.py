"""The modeled runtime table: every scheme's epoch time for each model, data set and link, at the split the
selection chooses and at the paper's inferred cut, with the split sweep and their figures
(experiments.runtime_table)."""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

from hier_jax import outputs
from hier_jax.data import STANDARD_SHAPES
from hier_jax.errors import UserError
from hier_jax.link import get_link
from hier_jax.models import build_model
from hier_jax.runtime_model import costmodel, profiler, reported, selection
from hier_jax.runtime_model.hardware import paper_devices
from hier_jax.runtime_model.profile import with_payload_batch

HIER_SCHEMES = ("split_learning", "hierarchical_per_batch", "hierarchical_pipelined")
SCHEME_ORDER = ("end_to_end", "end_to_end_once") + HIER_SCHEMES
BARS = tuple((s, "selection" if s in HIER_SCHEMES else "") for s in SCHEME_ORDER) + (
    ("hierarchical_per_batch", "paper_inferred"),
    ("hierarchical_pipelined", "paper_inferred"),
)


def paper_reduction(model: str, dataset: str, link: str) -> float | None:
    """The paper's reduction beside our row: it reports one for 3G only."""
    return reported.paper_reduction(model, dataset) if link == "3g" else None


def load_or_profile(args: argparse.Namespace, model_name: str, dataset: str) -> profiler.Profile:
    """The CPU profile of one model on one data set's shapes, measured once and cached as JSON."""
    spec = STANDARD_SHAPES[dataset]
    path = Path(args.out) / "profiles" / f"{model_name}_{dataset}_b{args.profile_batch}.json"
    bits = tuple(sorted(set(profiler.DEFAULT_BITS) | set(args.bits)))
    profile = profiler.cached_profile(
        path,
        lambda: build_model(model_name, num_classes=spec.num_classes, input_shape=spec.image_shape),
        refresh=args.reprofile,
        batch=args.profile_batch,
        repeats=args.repeats,
        payload_batch=args.batch,
        bits=bits,
        measure_whole=False,
    )
    if profile.payload_batch != args.batch or not set(bits) <= set(profile.splits[0].payload_bytes):
        profile = with_payload_batch(profile, args.batch, bits)
    return profile


def devices(profile: profiler.Profile, args: argparse.Namespace) -> tuple[profiler.Profile, profiler.Profile]:
    """(edge, cloud) profiles of the paper's hardware from the CPU profile."""
    return paper_devices(
        profile,
        time_source=args.time_source,
        count=args.flop_count,
        cloud_flops=args.cloud_tflops * 1e12,
        edge_slowdown=args.edge_slowdown,
    )


def model_rows(args: argparse.Namespace, model_name: str, dataset: str) -> tuple[list[dict], list[dict]]:
    """Table rows (each scheme at its own best split and bits) and split-sweep rows, for every link."""
    spec = STANDARD_SHAPES[dataset]
    edge, cloud = devices(load_or_profile(args, model_name, dataset), args)
    budget = int(args.memory_budget_gib * 2**30)
    rows, sweep = [], []
    for link_name in args.links:
        link = get_link(link_name)
        any_point = edge.splits[0].name
        w = selection.workload(edge, cloud, any_point, args.bits[0], batch=args.batch, num_examples=spec.num_train)
        base = {s: costmodel.epoch_time(s, w, link, args.epochs) for s in ("end_to_end", "end_to_end_once")}
        common = {
            "model": model_name,
            "dataset": dataset,
            "link": link_name,
            "paper_reduction": paper_reduction(model_name, dataset, link_name),
        }
        for scheme in ("end_to_end", "end_to_end_once"):
            rows.append(
                {
                    **common,
                    "scheme": scheme,
                    "split_choice": "",
                    "split": "",
                    "bits": "",
                    "epoch_s": base[scheme],
                    "edge_memory_mib": 0.0,
                    "fits_memory": True,
                }
            )
        for scheme in HIER_SCHEMES:
            try:
                ranked = selection.select_split(
                    edge,
                    cloud,
                    link,
                    batch=args.batch,
                    num_examples=spec.num_train,
                    memory_budget_bytes=budget,
                    epochs=args.epochs,
                    scheme=scheme,
                    bits=(32,) if scheme == "split_learning" else tuple(args.bits),
                )
            except ValueError as error:
                if "memory budget" not in str(error):
                    raise
                # A budget below every separation point's need: the flag's value, known only from the profile.
                raise UserError(
                    f"--memory-budget-gib {args.memory_budget_gib:g} is too small for {model_name} on "
                    f"{dataset}: {error}"
                ) from None
            chosen = [("selection", ranked.best)]
            if scheme != "split_learning":
                point = reported.paper_split(model_name, dataset)
                chosen.append(
                    (
                        "paper_inferred",
                        next(c for c in ranked.candidates if c.split == point and c.bits == args.bits[0]),
                    )
                )
            for choice, c in chosen:
                rows.append(
                    {
                        **common,
                        "scheme": scheme,
                        "split_choice": choice,
                        "split": c.split,
                        "bits": c.bits,
                        "epoch_s": c.epoch_s,
                        "edge_memory_mib": c.edge_memory_bytes / 2**20,
                        "fits_memory": c.fits,
                    }
                )
        for s in edge.splits:
            w = selection.workload(edge, cloud, s.name, args.bits[0], batch=args.batch, num_examples=spec.num_train)
            sweep.append(
                {
                    "model": model_name,
                    "dataset": dataset,
                    "link": link_name,
                    "split": s.name,
                    "index": s.index,
                    "bits": args.bits[0],
                    "fits_memory": s.edge_memory_bytes(args.batch) <= budget,
                    **{scheme: costmodel.epoch_time(scheme, w, link, args.epochs) for scheme in SCHEME_ORDER},
                }
            )
    for row in rows:
        ref = next(r for r in rows if r["link"] == row["link"] and r["scheme"] == "end_to_end")
        once = next(r for r in rows if r["link"] == row["link"] and r["scheme"] == "end_to_end_once")
        row["reduction_vs_end_to_end"] = costmodel.reduction(row["epoch_s"], ref["epoch_s"])
        row["reduction_vs_end_to_end_once"] = costmodel.reduction(row["epoch_s"], once["epoch_s"])
    return rows, sweep


def assumptions(args: argparse.Namespace) -> list[str]:
    count = (
        "the conventional flop count (convolutions' padding taps counted, as in the throughput's calibration)"
        if args.flop_count == "conventional"
        else "XLA's flop count (convolutions' padding taps left out)"
    )
    time_source = (
        f"{count} of each stage's jitted program (on this CPU) / the device's throughput"
        if args.time_source == "flops"
        else "per-stage times measured on this CPU, rescaled by one factor so the whole model runs at the "
        f"cloud's throughput ({count})"
    )
    return [
        f"cloud: RTX 2080 Ti at {args.cloud_tflops:.2f} TFLOP/s sustained (Lambda Labs: 294 img/s FP32 ResNet-50 "
        f"training x 22.8 GFLOP/img); edge: Quadro K620, {args.edge_slowdown:.1f}x slower (FP32 peaks "
        f"13.45 TFLOPS / 0.863 TFLOPS)",
        f"stage times: {time_source}; profiled at batch {args.profile_batch}, scaled linearly to batch "
        f"{args.batch}; sum of stages stands for the fused model",
        f"edge memory budget {args.memory_budget_gib:g} GiB (the K620's 2 GB): params + momentum + grads + "
        f"BN stats + autodiff residuals of edge stages and exit head",
        f"end_to_end streams raw uint8 batches every epoch (online data); end_to_end_once uploads the data set "
        f"once and trains {args.epochs} epochs on it (the time shown is per epoch, upload amortized)",
        f"hierarchical payloads at {'/'.join(map(str, args.bits))} bits, bytes of the real packed payload; "
        f"split learning sends float32 up and the float32 gradient down",
        *(f"link {name}: {get_link(name).source}" for name in args.links),
    ]


def print_table(rows: list[dict], lines: list[str]) -> None:
    print("assumptions:")
    for line in lines:
        print(f"  - {line}")
    header = (
        f"{'model':<12} {'dataset':<14} {'link':<4} {'scheme':<23} {'chosen by':<14} {'split':<9} "
        f"{'bits':>4} {'epoch_s':>9} {'vs cloud':>9} {'paper':>6} {'edge MiB':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        paper = (
            ""
            if r["paper_reduction"] is None or not r["scheme"].startswith("hier")
            else f"{100 * r['paper_reduction']:.0f}%"
        )
        memory = f"{r['edge_memory_mib']:.0f}" + ("" if r["fits_memory"] else "!")
        print(
            f"{r['model']:<12} {r['dataset']:<14} {r['link']:<4} {r['scheme']:<23} {r['split_choice']:<14} "
            f"{r['split']:<9} {str(r['bits']):>4} {r['epoch_s']:>9.1f} {100 * r['reduction_vs_end_to_end']:>8.0f}% "
            f"{paper:>6} {memory:>9}"
        )
    print(
        "(! = over the edge memory budget; paper = the paper's reduction vs its cloud-only (end-to-end) "
        "baseline over 3G)"
    )


def write_csv(path: Path, rows: list[dict]) -> None:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    outputs.write_atomic(path, text.getvalue())


def plot_table(rows: list[dict], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(args.dataset), len(args.links), figsize=(5.5 * len(args.links), 4 * len(args.dataset)), squeeze=False
    )
    width = 0.8 / len(BARS)
    for i, dataset in enumerate(args.dataset):
        for j, link in enumerate(args.links):
            ax = axes[i][j]
            for k, (scheme, choice) in enumerate(BARS):
                values = [
                    next(
                        r
                        for r in rows
                        if (r["model"], r["dataset"], r["link"], r["scheme"], r["split_choice"])
                        == (m, dataset, link, scheme, choice)
                    )
                    for m in args.model
                ]
                xs = [x + (k - len(BARS) / 2 + 0.5) * width for x in range(len(args.model))]
                ax.bar(
                    xs,
                    [r["epoch_s"] for r in values],
                    width,
                    hatch="//" if choice == "paper_inferred" else None,
                    label=scheme + (" @ paper's cut" if choice == "paper_inferred" else ""),
                )
                if scheme.startswith("hier"):
                    for x, r in zip(xs, values, strict=False):
                        ax.annotate(
                            f"{100 * r['reduction_vs_end_to_end']:.0f}%",
                            (x, r["epoch_s"]),
                            ha="center",
                            va="bottom",
                            fontsize=6,
                            rotation=90,
                        )
            labels = [
                m + ("" if (paper := paper_reduction(m, dataset, link)) is None else f"\npaper {100 * paper:.0f}%")
                for m in args.model
            ]
            ax.set_xticks(range(len(args.model)), labels, fontsize=8)
            ax.set_yscale("log")
            ax.set_ylabel("epoch time (s, modeled)")
            ax.set_title(f"{dataset}, {link}")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.suptitle(
        "Epoch time per scheme, at the selected split or the paper's inferred cut; % = reduction vs end_to_end"
    )
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    outputs.save_figure(fig, path, dpi=120)
    plt.close(fig)


def plot_sweep(sweep: list[dict], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(args.model), len(args.dataset), figsize=(6 * len(args.dataset), 3.5 * len(args.model)), squeeze=False
    )
    for i, model in enumerate(args.model):
        for j, dataset in enumerate(args.dataset):
            ax = axes[i][j]
            for link in args.links:
                pts = [r for r in sweep if (r["model"], r["dataset"], r["link"]) == (model, dataset, link)]
                xs = [r["index"] for r in pts]
                (line,) = ax.plot(
                    xs,
                    [r["hierarchical_pipelined"] for r in pts],
                    marker="o",
                    ms=3,
                    label=f"{link} hierarchical (pipelined)",
                )
                ax.plot(
                    xs,
                    [r["hierarchical_per_batch"] for r in pts],
                    ls="--",
                    color=line.get_color(),
                    label=f"{link} hierarchical (paper)",
                )
                ax.axhline(pts[0]["end_to_end"], color=line.get_color(), ls=":", label=f"{link} end_to_end")
                over = [r for r in pts if not r["fits_memory"]]
                ax.scatter(
                    [r["index"] for r in over],
                    [r["hierarchical_pipelined"] for r in over],
                    marker="x",
                    color="red",
                    zorder=3,
                    label="over edge memory" if link == args.links[0] else None,
                )
            ax.set_xticks(xs, [r["split"] for r in pts], rotation=90, fontsize=6)
            ax.set_yscale("log")
            ax.set_ylabel("epoch time (s)")
            ax.set_title(f"{model}, {dataset}, {args.bits[0]} bits")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    outputs.save_figure(fig, path, dpi=120)
    plt.close(fig)
