"""REPORT.md: the grid's tables (accuracy per cut and bit width, baselines, bytes and modeled runtime, the
outage) and the chosen cut."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from hier_jax import cli, outputs
from hier_jax.data import DataShape
from hier_jax.errors import UserError
from hier_jax.link import get_link
from hier_jax.paper.cells import group_rows
from hier_jax.paper.figures import plot_accuracy_vs_bits, plot_accuracy_vs_cut, plot_accuracy_vs_reduction
from hier_jax.paper.profiles import OUTAGE_BUFFER, OUTAGE_FRACTION, Cell, GridProfile, cut_order
from hier_jax.paper.runtime import REPORT_LINKS, XLA_SUFFIX, RuntimeModel
from hier_jax.runtime_model import costmodel, profiler, selection
from hier_jax.runtime_model.hardware import K620_MEMORY_BYTES
from hier_jax.runtime_model.reported import paper_reduction


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and the sample standard deviation (ddof=1) over seeds."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def fmt(values: list[float | None], scale: float = 100, digits: int = 1) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "–"
    mean, std = mean_std(present)
    return f"{scale * mean:.{digits}f}" + (f" ± {scale * std:.{digits}f}" if len(present) > 1 else "")


def markdown_table(header: list[str], lines: list[list[str]]) -> str:
    return "\n".join(
        ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        + ["| " + " | ".join(map(str, line)) + " |" for line in lines]
    )


def accuracy_table(rows: list[dict]) -> str:
    hier, e2e = group_rows(rows, "hierarchical"), group_rows(rows, "end_to_end")
    lines = []
    for (dataset, model, cut, bits), cell_rows in sorted(
        hier.items(), key=lambda kv: (kv[0][0], kv[0][1], cut_order(kv[0][1]).get(kv[0][2], 99), kv[0][3])
    ):
        reference = next((v for k, v in e2e.items() if k[:2] == (dataset, model)), [])
        diffs = [
            r["cloud_minus_end_to_end_pts"] / 100 for r in cell_rows if r["cloud_minus_end_to_end_pts"] is not None
        ]
        lines.append(
            [
                dataset,
                model,
                cut,
                bits,
                fmt([r["edge_accuracy"] for r in cell_rows]),
                fmt([r["cloud_accuracy"] for r in cell_rows]),
                fmt([r["cloud_accuracy"] for r in reference]),
                fmt(diffs, digits=2) if diffs else "–",
                len(cell_rows),
            ]
        )
    return markdown_table(
        [
            "data set",
            "model",
            "cut",
            "bits",
            "edge exit %",
            "cloud exit %",
            "end-to-end %",
            "cloud − end-to-end (pts)",
            "seeds",
        ],
        lines,
    )


def baseline_table(rows: list[dict]) -> str:
    lines = []
    for scheme in ("end_to_end", "split_learning"):
        for (dataset, model, cut, _bits), cell_rows in sorted(group_rows(rows, scheme).items()):
            lines.append(
                [
                    dataset,
                    model,
                    scheme,
                    cut or "(unsplit)",
                    fmt([r["cloud_accuracy"] for r in cell_rows]),
                    f"{cell_rows[0]['payload_bytes_per_image']:,.0f}",
                    len(cell_rows),
                ]
            )
    return markdown_table(
        ["data set", "model", "scheme", "cut", "accuracy %", "link bytes / image (per step)", "seeds"], lines
    )


def bytes_runtime_table(rows: list[dict]) -> str:
    lines = []
    for (dataset, model, cut, bits), cell_rows in sorted(
        group_rows(rows, "hierarchical").items(),
        key=lambda kv: (kv[0][0], kv[0][1], cut_order(kv[0][1]).get(kv[0][2], 99), kv[0][3]),
    ):
        r = cell_rows[0]
        paper = paper_reduction(model, dataset)
        lines.append(
            [
                dataset,
                model,
                cut,
                bits,
                f"{r['payload_bytes_per_image']:,.0f}",
                f"{r['raw_bytes_per_image']:,.0f}",
                f"{r['raw_bytes_per_image'] / r['payload_bytes_per_image']:.2f}x",
                *(f"{100 * r[f'reduction_vs_end_to_end_{lk}']:.0f} %" for lk in REPORT_LINKS),
                f"{100 * r[f'reduction_vs_end_to_end_3g{XLA_SUFFIX}']:.0f} %",
                "–" if paper is None else f"{100 * paper:.0f} % (3G)",
            ]
        )
    return markdown_table(
        [
            "data set",
            "model",
            "cut",
            "bits",
            "payload B / image",
            "raw B / image",
            "raw / payload",
            *(f"reduction {lk}" for lk in REPORT_LINKS),
            "reduction 3g, XLA's flops",
            "paper's reduction",
        ],
        lines,
    )


MEASURED_SCHEMES = ("split_learning", "hierarchical_sequential", "hierarchical_pipelined")
MEASURED_KEYS = ("model", "split", "bits", "preset", "scheme", "measured_step_s", "modeled_step_s",
                 "reduction_measured", "reduction_modeled")  # fmt: skip


def read_measured(path: str | Path) -> dict:
    """A bench_network.json (experiments.bench_network), or UserError in one line."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        missing = sorted({k for r in data["rows"] for k in MEASURED_KEYS if k not in r})
        problem = f"rows without {', '.join(missing)}" if missing else "" if data["rows"] else "no rows"
    except (OSError, ValueError, KeyError, TypeError) as error:
        problem = cli.one_line(error)
    if problem:
        raise UserError(f"--measured {path} is not a bench_network.json of experiments.bench_network ({problem})")
    return {**data, "path": str(path)}


def measured_section(measured: dict, rows: list[dict]) -> list[str]:
    s = measured["settings"]
    return [
        "## Runtime measured over shaped links",
        "",
        f"From `{measured['path']}` (experiments.bench_network) on {measured['cpu']}: edge and cloud as two "
        "processes over gRPC and TLS, a core each of this CPU, "
        f"the link between them shaped by the kernel; width {s['width']}, batch {s['batch']}. The measured "
        "reductions are this host's (edge and cloud equally fast, where the paper's cloud is modeled 15.6x "
        "faster than its edge); beside them the cost model's on the same host, whose agreement with the "
        "measured step is what vouches for its prediction on the paper's hardware (the grid's cell of the same "
        "model, cut and bits, hierarchical cells in the paper's per-batch schedule). Propagation delay is not "
        "emulated.",
        "",
        measured_table(measured, rows),
        "",
    ]


def measured_table(measured: dict, rows: list[dict]) -> str:
    """The reductions measured over shaped links beside the model's on the same host and the grid's on
    the paper's hardware (the hierarchical cell of the same model, cut and bits)."""
    grid = {scheme: group_rows(rows, scheme) for scheme in ("hierarchical", "split_learning")}
    lines = []
    for r in measured["rows"]:
        if r["scheme"] not in MEASURED_SCHEMES:
            continue
        hierarchical = r["scheme"] != "split_learning"
        cells = [c for (_, model, cut, bits), cs in grid["hierarchical" if hierarchical else "split_learning"].items()
                 for c in cs if (model, cut) == (r["model"], r["split"])
                 and (not hierarchical or int(bits) == int(r["bits"]))]  # fmt: skip
        modeled = cells[0].get(f"reduction_vs_end_to_end_{r['preset']}") if cells else None
        paper = paper_reduction(r["model"], "cifar10") if r["preset"] == "3g" and hierarchical else None
        lines.append(
            [
                r["model"],
                r["split"],
                r["bits"],
                r["preset"],
                r["scheme"],
                f"{r['measured_step_s']:.3f} / {r['modeled_step_s']:.3f}",
                f"{100 * r['reduction_measured']:.0f} %",
                f"{100 * r['reduction_modeled']:.0f} %",
                "–" if modeled is None else f"{100 * modeled:.0f} %",
                "–" if paper is None else f"{100 * paper:.0f} %",
            ]
        )
    return markdown_table(
        [
            "model",
            "cut",
            "bits",
            "link",
            "scheme",
            "step s, measured / modeled",
            "reduction measured",
            "modeled, this host",
            "modeled, paper's hardware",
            "paper's",
        ],
        lines,
    )


def outage_table(rows: list[dict]) -> str:
    hier = group_rows(rows, "hierarchical")
    lines = []
    for (dataset, model, cut, bits), cell_rows in sorted(group_rows(rows, "hierarchical_outage").items()):
        clean = hier.get((dataset, model, cut, bits), [])
        r = cell_rows[0]
        link = r.get("link", {})
        lines.append(
            [
                dataset,
                model,
                cut,
                bits,
                r["steps"],
                f"{link.get('outages')}",
                link.get("sent"),
                link.get("delivered"),
                link.get("dropped"),
                fmt([x["edge_accuracy"] for x in cell_rows]),
                fmt([x["cloud_accuracy"] for x in cell_rows]),
                fmt([x["cloud_accuracy"] for x in clean]),
            ]
        )
    return markdown_table(
        [
            "data set",
            "model",
            "cut",
            "bits",
            "steps",
            "link down (steps)",
            "sent",
            "delivered",
            "dropped",
            "edge exit %",
            "cloud exit %",
            "cloud exit % without outage",
        ],
        lines,
    )


def chosen_cuts(
    rows: list[dict], runtime: RuntimeModel, shapes: dict[str, DataShape], profile: GridProfile, tolerance_pts: float
) -> tuple[str, str]:
    """select_split fed with the measured accuracies, per data set, model and link."""
    hier, e2e = group_rows(rows, "hierarchical"), group_rows(rows, "end_to_end")
    lines = []
    by_model = defaultdict(dict)
    for (dataset, model, cut, bits), cell_rows in hier.items():
        by_model[(dataset, model)][(cut, bits)] = float(np.mean([r["cloud_accuracy"] for r in cell_rows]))
    for (dataset, model), accuracy in sorted(by_model.items()):
        if dataset not in shapes:
            continue
        reference = next((v for k, v in e2e.items() if k[:2] == (dataset, model)), None)
        ref_acc = None if reference is None else float(np.mean([r["cloud_accuracy"] for r in reference]))
        ds = shapes[dataset]
        edge, cloud = runtime.devices(model, ds)
        for link in REPORT_LINKS:
            try:
                chosen = selection.select_split(
                    edge,
                    cloud,
                    get_link(link),
                    batch=profile.config.batch_size,
                    num_examples=ds.num_train,
                    memory_budget_bytes=K620_MEMORY_BYTES,
                    bits=sorted({b for _, b in accuracy}),
                    scheme="hierarchical_per_batch",
                    accuracy=accuracy,
                    max_accuracy_drop=tolerance_pts / 100,
                    reference_accuracy=ref_acc,
                ).best
                assert chosen.accuracy is not None  # with an accuracy table, only measured points are eligible
                base = costmodel.epoch_time(
                    "end_to_end",
                    selection.workload(
                        edge,
                        cloud,
                        chosen.split,
                        chosen.bits,
                        batch=profile.config.batch_size,
                        num_examples=ds.num_train,
                    ),
                    get_link(link),
                )
                saved = costmodel.reduction(chosen.epoch_s, base)
                lines.append(
                    [
                        dataset,
                        model,
                        link,
                        chosen.split,
                        chosen.bits,
                        f"{100 * chosen.accuracy:.1f}",
                        "–" if ref_acc is None else f"{100 * ref_acc:.1f}",
                        f"{100 * saved:.0f} %" + (" (end-to-end is faster here)" if saved < 0 else ""),
                    ]
                )
            except ValueError as error:
                lines.append([dataset, model, link, "none", "–", "–", "–", str(error).split(";")[0]])
    reference_rule = (
        f"at most {tolerance_pts:g} point(s) below end-to-end training's accuracy (or below the best "
        f"cell where end-to-end did not run)"
    )
    return reference_rule, markdown_table(
        ["data set", "model", "link", "chosen cut", "bits", "cloud exit %", "end-to-end %", "modeled reduction"], lines
    )


def write_report(
    out: Path,
    profile: GridProfile,
    rows: list[dict],
    cells: list[Cell],
    skipped: list[str],
    runtime: RuntimeModel,
    shapes: dict[str, DataShape],
    tolerance_pts: float,
    grid_wall_s: float,
    command: str,
    measured: dict | None = None,
) -> None:
    figures = {
        "accuracy_vs_cut.png": "Edge and cloud exit accuracy against the cut",
        "accuracy_vs_bits.png": "Accuracy against the bit width of the hand-off",
        "accuracy_vs_reduction.png": "Cloud exit accuracy (relative to end-to-end) against the modeled "
        "runtime reduction",
    }
    plot_accuracy_vs_cut(rows, out / "accuracy_vs_cut.png", profile.main_bits)
    plot_accuracy_vs_bits(rows, out / "accuracy_vs_bits.png", profile.sweep_cut)
    plot_accuracy_vs_reduction(rows, out / "accuracy_vs_reduction.png")
    rule, choice_table = chosen_cuts(rows, runtime, shapes, profile, tolerance_pts)
    failed = [r for r in rows if r["status"] == "failed"]
    c = profile.config
    done = sum(r["status"] == "done" for r in rows)
    trained_s = sum(r["wall_s"] for r in rows if r["status"] == "done")
    lines = [
        f"# Paper grid, profile `{profile.name}`",
        "",
        f"Written by `{command}`: {done} cells done ({len(cells)} asked for by that command), {len(failed)} "
        f"failed; the cells' training took {trained_s / 60:.0f} min in all (evaluation, compilation and the "
        f"runtime model come on top), the last invocation {grid_wall_s / 60:.1f} min, on {profiler.host_cpu()}. Every "
        f"figure below "
        f"comes from `results.csv` beside this file (the outage's link counts from the cells' result.json).",
        "",
        "## Budget",
        "",
        f"- {profile.description}.",
        f"- Every cell: batch {c.batch_size}, width {c.width}, "
        + (f"{c.max_steps} steps" if c.max_steps else f"{c.epochs} epochs")
        + f", edge and cloud optimizers {c.edge_optimizer} / {c.cloud_optimizer}; exit head "
        f"{c.head.convs} conv of {c.head.channels} channels pooled to {c.head.grid}x{c.head.grid}.",
        "- Hierarchical cells run pipelined (edge and cloud on their own devices, bit-identical to sequential); "
        "the baselines start from the same initial weights and see the same batches.",
        f"- Runtime: the cost model (`costmodel`, docs/runtime_model.md) on the paper's hardware (RTX 2080 Ti cloud, "
        f"Quadro K620 edge, modeled from the flop count of each stage at width {profile.runtime_width}), batch "
        f"{c.batch_size}, the paper's per-batch schedule (`hierarchical_per_batch`) against `end_to_end`. The "
        "flops are counted conventionally, a convolution's padding taps included, as the throughput is calibrated "
        "and as the hardware computes them; XLA's count leaves them out (one column below; docs/runtime_model.md).",
        "",
        "## Accuracy per cut and bit width against end-to-end training",
        "",
        accuracy_table(rows),
        "",
        f"![{figures['accuracy_vs_cut.png']}](accuracy_vs_cut.png)",
        "",
        "## Bit sweep",
        "",
        f"![{figures['accuracy_vs_bits.png']}](accuracy_vs_bits.png)",
        "",
        "## Baselines at the same budget",
        "",
        "End-to-end training of the unsplit model is what the paper's cloud-only training computes; vanilla "
        "split learning "
        "backpropagates through the cut, so it trains the same function (its accuracy should match end-to-end's "
        "up to float reassociation).",
        "",
        baseline_table(rows),
        "",
        "## Payload and modeled runtime per cut",
        "",
        f"Bytes per image are those of the trained model (width {c.width}); the reductions are modeled at width "
        f"{profile.runtime_width} with that width's payload.",
        "",
        bytes_runtime_table(rows),
        "",
        f"![{figures['accuracy_vs_reduction.png']}](accuracy_vs_reduction.png)",
        "",
        'The stars are the paper\'s reported reductions over 3G with its "negligible" accuracy drop (plotted at 0): '
        "the paper's numbers, not ours.",
        "",
        *(measured_section(measured, rows) if measured else []),
        "## The chosen cut",
        "",
        f"`selection.select_split(accuracy=...)` fed with the measured cloud-exit accuracies; tolerance: {rule}; "
        f"edge memory budget {K620_MEMORY_BYTES / 2**30:g} GiB (the K620).",
        "",
        choice_table,
        "",
        "## Link outage",
        "",
        f"The link is down for the middle {100 * OUTAGE_FRACTION:.0f} % of the steps; the edge trains on (its step "
        f"count is the grid's), payloads sent during the outage are dropped once the edge's buffer of {OUTAGE_BUFFER} "
        "is full, and "
        "every payload is delivered or counted as dropped (sent = delivered + dropped).",
        "",
        outage_table(rows),
        "",
    ]
    if skipped or failed:
        lines += ["## Skipped and failed cells", ""]
        lines += [f"- skipped: {reason}" for reason in skipped]
        lines += [
            f"- failed: {r['model']} {r['cut']} {r['bits']} bits {r['scheme']} seed {r['seed']}: {r['error']}"
            for r in failed
        ]
        lines.append("")
    outputs.write_atomic(out / "REPORT.md", "\n".join(lines))
