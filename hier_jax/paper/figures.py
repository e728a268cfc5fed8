"""The report's figures: accuracy against the cut, against the bit width, and against the modeled reduction."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hier_jax import outputs
from hier_jax.paper.cells import group_rows
from hier_jax.paper.profiles import cut_order
from hier_jax.runtime_model.reported import paper_reduction

PLOT_LINKS = ("3g", "4g", "wifi")
REDUCTION_AXIS_MIN = -100  # %: slower cuts are drawn at this edge of the figure


def plot_accuracy_vs_cut(rows: list[dict], path: Path, bits: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hier, e2e, sl = group_rows(rows, "hierarchical"), group_rows(rows, "end_to_end"), group_rows(rows, "split_learning")
    panels = sorted({(k[0], k[1]) for k in hier})
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.5 * max(len(panels), 1), 3.6), squeeze=False)
    for ax, (dataset, model) in zip(axes[0], panels, strict=False):
        order = cut_order(model)
        for b, style in ((bits, "-"), (32, "--")):
            pts = sorted(((order[k[2]], k[2], v) for k, v in hier.items() if k[:2] == (dataset, model) and k[3] == b))
            if not pts:
                continue
            xs = [p[0] for p in pts]
            ax.plot(
                xs,
                [100 * np.mean([r["cloud_accuracy"] for r in p[2]]) for p in pts],
                "o" + style,
                color="C0",
                label=f"cloud exit, {b} bits",
            )
            ax.plot(
                xs,
                [100 * np.mean([r["edge_accuracy"] for r in p[2]]) for p in pts],
                "s" + style,
                color="C1",
                label=f"edge exit, {b} bits",
            )
            ax.set_xticks(xs, [p[1] for p in pts])
        for k, v in e2e.items():
            if k[:2] == (dataset, model):
                ax.axhline(100 * np.mean([r["cloud_accuracy"] for r in v]), color="k", ls=":", label="end-to-end")
        for k, v in sl.items():
            if k[:2] == (dataset, model):
                ax.plot(
                    [order[k[2]]],
                    [100 * np.mean([r["cloud_accuracy"] for r in v])],
                    "x",
                    color="C3",
                    ms=9,
                    label="split learning",
                )
        ax.set(xlabel="cut (last edge stage)", ylabel="test accuracy (%)", title=f"{model} on {dataset}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    outputs.save_figure(fig, path, dpi=120)
    plt.close(fig)


def plot_accuracy_vs_bits(rows: list[dict], path: Path, sweep_cut: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hier, e2e = group_rows(rows, "hierarchical"), group_rows(rows, "end_to_end")
    panels = sorted({(k[0], k[1], sweep_cut[k[1]]) for k in hier if k[2] == sweep_cut.get(k[1])})
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.5 * max(len(panels), 1), 3.6), squeeze=False)
    for ax, (dataset, model, cut) in zip(axes[0], panels, strict=False):
        pts = sorted((k[3], v) for k, v in hier.items() if k[:3] == (dataset, model, cut))
        xs = [p[0] for p in pts]
        ax.plot(xs, [100 * np.mean([r["cloud_accuracy"] for r in p[1]]) for p in pts], "o-", label="cloud exit")
        ax.plot(xs, [100 * np.mean([r["edge_accuracy"] for r in p[1]]) for p in pts], "s-", label="edge exit")
        for k, v in e2e.items():
            if k[:2] == (dataset, model):
                ax.axhline(100 * np.mean([r["cloud_accuracy"] for r in v]), color="k", ls=":", label="end-to-end")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set(
            xlabel="bits per feature value (32 = float32)",
            ylabel="test accuracy (%)",
            title=f"{model} at {cut} on {dataset}",
        )
        ax.legend(fontsize=7)
    fig.tight_layout()
    outputs.save_figure(fig, path, dpi=120)
    plt.close(fig)


def plot_accuracy_vs_reduction(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [
        r
        for r in rows
        if r["status"] == "done"
        and r["scheme"] in ("hierarchical", "split_learning")
        and r["cloud_minus_end_to_end_pts"] is not None
        and r.get("reduction_vs_end_to_end_3g") is not None
    ]
    fig, axes = plt.subplots(1, len(PLOT_LINKS), figsize=(4.8 * len(PLOT_LINKS), 3.8), squeeze=False)
    series = sorted({(r["dataset"], r["model"]) for r in done})
    for ax, link in zip(axes[0], PLOT_LINKS, strict=False):
        for i, (dataset, model) in enumerate(series):
            for scheme, marker in (("hierarchical", "o"), ("split_learning", "x")):
                pts = [r for r in done if (r["dataset"], r["model"], r["scheme"]) == (dataset, model, scheme)]
                if not pts:
                    continue
                # Cuts far slower than end-to-end (float32 hand-offs) would squash the rest: drawn at the edge.
                xs = [max(100 * r[f"reduction_vs_end_to_end_{link}"], REDUCTION_AXIS_MIN) for r in pts]
                ys = [r["cloud_minus_end_to_end_pts"] for r in pts]
                ax.scatter(
                    xs,
                    ys,
                    marker=marker,
                    color=f"C{i}",
                    s=22,
                    label=f"{model} on {dataset} ({scheme.replace('_', ' ')})",
                )
                if scheme == "hierarchical":
                    for x, y, r in zip(xs, ys, pts, strict=False):
                        ax.annotate(f"{r['cut']}/{r['bits']}b", (x, y), fontsize=5)
            paper = paper_reduction(model, dataset)
            if link == "3g" and paper is not None:
                ax.scatter(
                    [100 * paper],
                    [0.0],
                    marker="*",
                    s=120,
                    color=f"C{i}",
                    edgecolor="k",
                    label=f'the paper\'s {model.removesuffix("_tv")}: {100 * paper:.0f} %, "negligible" drop',
                )
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xlim(REDUCTION_AXIS_MIN - 5, 100)
        ax.set(
            xlabel=f"modeled reduction vs end-to-end over {link} (%; ≤ {REDUCTION_AXIS_MIN} drawn at it)",
            ylabel="cloud exit − end-to-end (pts)",
            title=link,
        )
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.tight_layout()
    outputs.save_figure(fig, path, dpi=120)
    plt.close(fig)
