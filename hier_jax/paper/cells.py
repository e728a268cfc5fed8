"""One cell: trained through the library (`train.build`, `train.train`), resumed from its checkpoints, its
result row; and the rows of every cell in a grid directory, as results.csv."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections import defaultdict
from pathlib import Path

from hier_jax import outputs, train
from hier_jax.data import DataShape, ImageDataset
from hier_jax.paper.profiles import SCHEMES, Cell, GridProfile, cell_config, cut_order, dataset_key
from hier_jax.paper.runtime import REPORT_LINKS, XLA_SUFFIX
from hier_jax.quantization import raw_image_nbytes
from hier_jax.run.checkpoint import RunCheckpoints

CSV_COLUMNS = (
    "model",
    "dataset",
    "cut",
    "bits",
    "scheme",
    "profile",
    "seed",
    "steps",
    "status",
    "edge_accuracy",
    "cloud_accuracy",
    "end_to_end_accuracy",
    "cloud_minus_end_to_end_pts",
    "payload_bytes_per_image",
    "raw_bytes_per_image",
    *(f"reduction_vs_end_to_end_{link}" for link in REPORT_LINKS),
    *(f"reduction_vs_end_to_end_{link}{XLA_SUFFIX}" for link in REPORT_LINKS),
    "wall_s",
    "cloud_steps",
    "dropped_payloads",
    "error",
)


def run_cell(cell: Cell, profile: GridProfile, dataset: ImageDataset, cell_dir: Path) -> dict:
    """Train one cell (resuming its checkpoints if any), evaluate it and return its result row."""
    config = cell_config(profile, cell, dataset)
    setup = train.build(config, dataset)
    checkpoints = cell_dir / "checkpoints"
    resume = False
    if checkpoints.is_dir():
        with RunCheckpoints(checkpoints, read_only=True) as existing:
            resume = bool(existing.steps())
    result = train.train(setup, checkpoint_dir=checkpoints, resume=resume)
    accuracy = train.evaluate(setup, result)
    raw = raw_image_nbytes(1, *dataset.image_shape, num_classes=dataset.num_classes)
    row = {
        "model": cell.model,
        "dataset": dataset_key(cell.dataset),
        "cut": cell.cut,
        "bits": cell.bits,
        "scheme": cell.scheme,
        "profile": profile.name,
        "seed": cell.seed,
        "steps": setup.total_steps,
        "precision": setup.precision,
        "status": "done",
        "edge_accuracy": accuracy["edge_accuracy"],
        "cloud_accuracy": accuracy["cloud_accuracy"],
        # End-to-end is what cloud-only training computes: the raw images cross the link.
        "payload_bytes_per_image": raw if config.scheme == "end_to_end" else result.payload_bytes / config.batch_size,
        "raw_bytes_per_image": raw,
        "wall_s": result.wall_s,
        "cloud_steps": len(result.cloud_steps),
        "dropped_payloads": "",
        "error": "",
        "resumed_from_step": result.start_step,
        "data_shape": dataclasses.asdict(DataShape.of(dataset)),
    }
    if config.link.outages:
        # From the whole run's record, so a resumed cell counts the steps before its resume too: the edge
        # sends every step's payload; the cloud consumed those in cloud_steps, the rest were dropped.
        consumed = set(result.cloud_steps.tolist())
        dropped = [t for t in range(setup.total_steps) if t not in consumed]
        row["dropped_payloads"] = len(dropped)
        row["link"] = {
            "outages": [list(o) for o in config.link.outages],
            "sent": setup.total_steps,
            "delivered": len(consumed),
            "dropped": len(dropped),
            "dropped_steps": dropped,
        }
    return row


def load_rows(out: Path) -> list[dict]:
    """Result rows of every finished and failed cell in `out` (whatever this run's flags narrowed), with
    the end-to-end columns joined."""
    rows = []
    for cell_dir in sorted(p for p in (out / "cells").glob("*/*/*/*/seed*") if p.is_dir()):
        if (cell_dir / "result.json").exists():
            rows.append(json.loads((cell_dir / "result.json").read_text()))
        elif (cell_dir / "error.json").exists():
            dataset, model, where, scheme_bits, seed = cell_dir.relative_to(out / "cells").parts
            scheme, _, bits = scheme_bits.rpartition("-")
            error = json.loads((cell_dir / "error.json").read_text())
            rows.append(
                {
                    "model": model,
                    "dataset": dataset,
                    "cut": "" if where == "whole" else where,
                    "bits": int(bits.removesuffix("b")),
                    "scheme": scheme,
                    "seed": int(seed.removeprefix("seed")),
                    "status": "failed",
                    "error": error["error"],
                }
            )
    rows.sort(
        key=lambda r: (
            r["dataset"],
            r["model"],
            SCHEMES.index(r["scheme"]) if r["scheme"] in SCHEMES else 99,
            cut_order(r["model"]).get(r["cut"], -1),
            r["bits"],
            r["seed"],
        )
    )
    reference = {
        (r["dataset"], r["model"], r["seed"]): r["cloud_accuracy"]
        for r in rows
        if r["scheme"] == "end_to_end" and r["status"] == "done"
    }
    for r in rows:
        e2e = reference.get((r["dataset"], r["model"], r["seed"]))
        r["end_to_end_accuracy"] = e2e
        r["cloud_minus_end_to_end_pts"] = (
            None if e2e is None or r.get("cloud_accuracy") is None else 100 * (r["cloud_accuracy"] - e2e)
        )
    return rows


def write_results(out: Path, rows: list[dict]) -> None:
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})
    outputs.write_atomic(out / "results.csv", table.getvalue())


def group_rows(rows: list[dict], scheme: str) -> dict[tuple, list[dict]]:
    groups = defaultdict(list)
    for r in rows:
        if r["status"] == "done" and r["scheme"] == scheme:
            groups[(r["dataset"], r["model"], r["cut"], r["bits"])].append(r)
    return groups
