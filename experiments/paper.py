"""Reproduce the paper's grid: accuracy of both exits per model, cut and bit width, against end-to-end
training and vanilla split learning, with the modeled runtime of each cut; then the report.

    python -m experiments.paper --profile smoke --out DIR            # about a minute: digits, tiny widths
    python -m experiments.paper --profile cpu --out DIR              # about 75 minutes on 2 CPU cores
    python -m experiments.paper --profile full --out DIR --seeds 3   # the paper's scale, for a GPU
    python -m experiments.paper --profile cpu --out DIR --models vgg16 --cuts pool3 --bits 4 32

Every cell is one training run through the library (`train.build` and `train.train`, the code path
of experiments.train) in DIR/cells/NAME/: its checkpoints, then its result.json once it is done.
Running the same command again skips finished cells and resumes an interrupted one from its last
checkpoint (a killed grid loses at most one checkpoint interval of one cell); a cell that crashed is
recorded with its error (DIR/cells/NAME/error.json) and retried on the next run, and the grid goes
on. A DIR holds one profile's grid only (and refuses it if the profile's settings have changed since).
After every cell, DIR/results.csv is rewritten from every finished cell in DIR (a narrowed rerun keeps
the others); at the end DIR/REPORT.md and its figures (DIR/*.png) are written.

Cells: `hierarchical` at every cut of each model with the profile's bit widths at every cut and its
bit sweep at one cut; `end_to_end` (the unsplit model, what cloud-only training computes) and
`split_learning` (at the sweep cut) at the same budget; `hierarchical_outage`, the link down for
20 % of the steps (SimulatedLink), at the sweep cut. --bits narrows the hierarchical cells (the
baselines send float32 and always run); --cuts without the sweep cut leaves out split learning and the
outage. The modeled runtime columns are computed when results.csv is written, from a profile of each
model at the profile's runtime width with the trained exit head.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import shlex
import sys
import time
import traceback
from collections import defaultdict
from pathlib import Path

import numpy as np

from hier_jax import cli, outputs, process, train
from hier_jax.config import RUN_ONLY_FIELDS, ExperimentConfig, validate
from hier_jax.data import ImageDataset, load_dataset, num_train_steps
from hier_jax.errors import ConfigError, RunInterrupted, UserError
from hier_jax.link import SimulatedLink, get_link
from hier_jax.models import ExitHeadConfig, build_model, stage_names
from hier_jax.quantization import VALID_BITS, raw_image_nbytes
from hier_jax.run.checkpoint import RunCheckpoints
from hier_jax.runtime_model import costmodel, profiler, selection
from hier_jax.runtime_model.hardware import K620_MEMORY_BYTES, paper_devices

SCHEMES = ("hierarchical", "end_to_end", "split_learning", "hierarchical_outage")
REPORT_LINKS = ("3g", "4g", "5g", "wifi")
PLOT_LINKS = ("3g", "4g", "wifi")
REDUCTION_AXIS_MIN = -100  # %: slower cuts are drawn at this edge of the figure
OUTAGE_FRACTION = 0.2
OUTAGE_BUFFER = 2
SHARED_CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg"
# The paper's reported runtime reductions against cloud-only training over its 3G link, CIFAR-10 and Tiny
# ImageNet (../shared/PAPER.md); our resnet18 and resnet18_tv are both compared with its ResNet-18.
PAPER_REDUCTION = {
    ("vgg16", "cifar10"): 0.29,
    ("resnet18", "cifar10"): 0.61,
    ("vgg16", "tiny_imagenet"): 0.25,
    ("resnet18", "tiny_imagenet"): 0.81,
}
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
    *(f"reduction_vs_cloud_only_{link}" for link in REPORT_LINKS),
    "wall_s",
    "cloud_steps",
    "dropped_payloads",
    "error",
)


@dataclasses.dataclass(frozen=True)
class GridProfile:
    """One budget for the whole grid; `config` holds every training setting the cells share."""

    name: str
    description: str
    datasets: tuple[str, ...]
    cuts: dict[str, tuple[str, ...]]  # model -> its cuts
    sweep_cut: dict[str, str]  # model -> the cut of the bit sweep, split learning and the outage
    bits: tuple[int, ...]  # at every cut
    sweep_bits: tuple[int, ...]  # at the sweep cut only
    config: ExperimentConfig
    runtime_width: int  # width of the model the runtime model profiles (64: the paper's)
    main_bits: int = 4  # the hand-off of the outage cell and the figures' solid lines
    warmup_epochs: float = 0.0  # > 0: config.warmup_steps is this many epochs of each data set


def _default_cifar() -> str:
    return f"folder:{SHARED_CIFAR}" if SHARED_CIFAR.is_dir() else "cifar10"


def grid_profiles() -> dict[str, GridProfile]:
    return {
        "smoke": GridProfile(
            "smoke",
            "digits (8x8 scans scaled to 32x32), width 4, 20 steps of batch 32: checks the pipeline, not accuracy",
            ("digits",),
            {"resnet18_tv": ("layer1_1", "layer2_1")},
            {"resnet18_tv": "layer1_1"},
            (4, 32),
            (2,),
            ExperimentConfig(
                model="resnet18_tv",
                dataset="digits",
                width=4,
                batch_size=32,
                epochs=1,
                max_steps=20,
                learning_rate=0.05,
                head_channels=8,
                checkpoint_every=5,
                keep_checkpoints=2,
            ),
            runtime_width=4,
        ),
        "cpu": GridProfile(
            "cpu",
            "CIFAR-10, width 16 (a quarter of the paper's 64), 4 epochs of batch 128, SGD lr 0.05 with "
            "Nesterov momentum 0.9 and cosine decay, weight decay 5e-4, exit head of 64 channels; about 75 minutes "
            "on 2 CPU cores",
            (_default_cifar(),),
            {"resnet18_tv": ("layer1_1", "layer2_1", "layer3_1"), "vgg16": ("pool2", "pool3", "pool4")},
            {"resnet18_tv": "layer2_1", "vgg16": "pool3"},
            (4, 32),
            (2, 8),
            ExperimentConfig(
                width=16,
                batch_size=128,
                epochs=4,
                learning_rate=0.05,
                nesterov=True,
                head_channels=64,
                checkpoint_every=300,
                keep_checkpoints=2,
            ),
            runtime_width=64,
        ),
        "full": GridProfile(
            "full",
            "CIFAR-10 and Tiny ImageNet, width 64 (the paper's), 60 epochs of batch 128, SGD lr 0.05 with "
            "Nesterov momentum 0.9, 2-epoch warm-up and cosine decay, weight decay 5e-4; for a GPU host (devices "
            "auto: the first and the last accelerator)",
            ("cifar10", "tiny_imagenet"),
            {
                "vgg16": ("pool2", "pool3", "pool4"),
                "resnet18_tv": ("layer1_1", "layer2_1", "layer3_1"),
                "resnet18": ("layer1_1", "layer2_1"),
            },
            {"vgg16": "pool3", "resnet18_tv": "layer2_1", "resnet18": "layer1_1"},
            (2, 4, 8, 32),
            (),
            ExperimentConfig(
                width=64,
                batch_size=128,
                epochs=60,
                learning_rate=0.05,
                nesterov=True,
                checkpoint_every=1000,
                keep_checkpoints=2,
            ),
            runtime_width=64,
            warmup_epochs=2,
        ),
    }


@dataclasses.dataclass(frozen=True)
class Cell:
    dataset: str  # the data set spec (cifar10, folder:PATH, ...)
    model: str
    cut: str  # the model's split point ("" for end_to_end)
    bits: int  # 32 for the baselines (they send float32)
    scheme: str
    seed: int

    @property
    def name(self) -> str:
        where = self.cut or "whole"
        return f"{dataset_key(self.dataset)}/{self.model}/{where}/{self.scheme}-{self.bits}b/seed{self.seed}"


def dataset_key(spec: str) -> str:
    return Path(spec.removeprefix("folder:")).name if spec.startswith("folder:") else spec


def plan(
    profile: GridProfile,
    datasets: list[str],
    models: list[str],
    cuts: list[str] | None,
    bits: list[int] | None,
    schemes: list[str],
    seeds: int,
) -> list[Cell]:
    """Every cell of the grid, narrowed by the flags (checked against the profile by `check_args`)."""
    cells = []
    for dataset in datasets:
        for model in models:
            sweep = profile.sweep_cut[model]
            model_cuts = [c for c in profile.cuts[model] if cuts is None or c in cuts]
            for seed in range(seeds):
                for cut in model_cuts:
                    cut_bits = set(profile.bits) | (set(profile.sweep_bits) if cut == sweep else set())
                    for b in sorted(cut_bits):
                        if bits is None or b in bits:
                            cells.append(Cell(dataset, model, cut, b, "hierarchical", seed))
                if sweep in model_cuts:
                    cells.append(Cell(dataset, model, sweep, 32, "split_learning", seed))
                    if bits is None or profile.main_bits in bits:
                        cells.append(Cell(dataset, model, sweep, profile.main_bits, "hierarchical_outage", seed))
                cells.append(Cell(dataset, model, "", 32, "end_to_end", seed))
    return [c for c in cells if c.scheme in schemes]


def cell_config(profile: GridProfile, cell: Cell, dataset: ImageDataset) -> ExperimentConfig:
    config = dataclasses.replace(
        profile.config,
        model=cell.model,
        dataset=cell.dataset,
        split=cell.cut or profile.sweep_cut[cell.model],
        bits=cell.bits,
        seed=cell.seed,
    )
    if profile.warmup_epochs > 0:
        per_epoch = num_train_steps(dataset, config.batch_size)
        config = dataclasses.replace(config, warmup_steps=int(profile.warmup_epochs * per_epoch))
    return config


def outage_link(total_steps: int) -> SimulatedLink:
    """A 4G link (delays scaled down 100x so it never holds the edge back) down for the middle 20 %
    of the steps, with room for 2 payloads at the edge (older ones are dropped while it is down)."""
    first = int(total_steps * (0.5 - OUTAGE_FRACTION / 2))
    last = max(first + 1, int(total_steps * (0.5 + OUTAGE_FRACTION / 2)))
    return SimulatedLink(get_link("4g"), capacity=OUTAGE_BUFFER, outages=[(first, last)], time_scale=0.01)


@dataclasses.dataclass(frozen=True)
class DataShape:
    """What the runtime model needs of a data set."""

    image_shape: tuple[int, int, int]
    num_classes: int
    num_train: int

    @classmethod
    def of(cls, dataset: ImageDataset) -> DataShape:
        return cls(tuple(dataset.image_shape), dataset.num_classes, dataset.num_train)


class RuntimeModel:
    """Modeled reductions against cloud-only training on the paper's hardware: one profile per model and
    data shape, at the grid's runtime width with the exit head the grid trains (cached as
    DIR/profiles/*.json)."""

    def __init__(self, out: Path, profile: GridProfile):
        self.dir, self.grid = out / "profiles", profile
        c = profile.config
        self.head = ExitHeadConfig(c.head_channels, c.head_convs, c.head_grid)
        self._profiles: dict[tuple, tuple[profiler.Profile, profiler.Profile]] = {}

    def devices(self, model: str, shape: DataShape) -> tuple[profiler.Profile, profiler.Profile]:
        key = (model, shape.image_shape, shape.num_classes)
        if key not in self._profiles:
            h, w, c = shape.image_shape
            head = self.head
            path = self.dir / (
                f"{model}_w{self.grid.runtime_width}_{h}x{w}x{c}_{shape.num_classes}_head"
                f"{head.channels}x{head.convs}g{head.grid}_b{self.grid.config.batch_size}.json"
            )
            if path.exists():
                measured = profiler.load_profile(path)
            else:
                net = build_model(
                    model, num_classes=shape.num_classes, input_shape=shape.image_shape, width=self.grid.runtime_width
                )
                measured = profiler.profile_model(
                    net,
                    batch=2,
                    repeats=1,
                    warmup=0,
                    head=head,
                    payload_batch=self.grid.config.batch_size,
                    measure_whole=False,
                    progress=False,
                )
                profiler.save_profile(measured, path)
            self._profiles[key] = paper_devices(measured)
        return self._profiles[key]

    def reduction(self, row: dict, shape: DataShape, link: str) -> float:
        edge, cloud = self.devices(row["model"], shape)
        cut = row["cut"] or self.grid.sweep_cut[row["model"]]
        w = selection.workload(
            edge, cloud, cut, row["bits"], batch=self.grid.config.batch_size, num_examples=shape.num_train
        )
        scheme = {"end_to_end": "cloud_only", "split_learning": "split_learning"}.get(
            row["scheme"], "hierarchical_paper"
        )
        lk = get_link(link)
        return costmodel.reduction(costmodel.epoch_time(scheme, w, lk), costmodel.epoch_time("cloud_only", w, lk))


def run_cell(cell: Cell, profile: GridProfile, dataset: ImageDataset, cell_dir: Path) -> dict:
    """Train one cell (resuming its checkpoints if any), evaluate it and return its result row."""
    config = cell_config(profile, cell, dataset)
    setup = train.build(config, dataset)
    checkpoints = cell_dir / "checkpoints"
    resume = False
    if checkpoints.is_dir():
        with RunCheckpoints(checkpoints, read_only=True) as existing:
            resume = bool(existing.steps())
    mode = cell.scheme if cell.scheme in train.BASELINES else "overlapped"
    link = outage_link(setup.total_steps) if cell.scheme == "hierarchical_outage" else None
    result = train.train(setup, mode, channel=link, checkpoint_dir=checkpoints, resume=resume)
    accuracy = train.evaluate(setup, result)
    raw = raw_image_nbytes(1, *dataset.image_shape, dataset.num_classes)
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
        "payload_bytes_per_image": raw if mode == "end_to_end" else result.payload_bytes / config.batch_size,
        "raw_bytes_per_image": raw,
        "wall_s": result.wall_s,
        "cloud_steps": len(result.cloud_steps),
        "dropped_payloads": "",
        "error": "",
        "resumed_from_step": result.start_step,
        "data_shape": dataclasses.asdict(DataShape.of(dataset)),
    }
    if link is not None:
        # From the whole run's record, so a resumed cell counts the steps before its resume too: the edge
        # sends every step's payload; the cloud consumed those in cloud_steps, the rest were dropped.
        consumed = set(result.cloud_steps.tolist())
        dropped = [t for t in range(setup.total_steps) if t not in consumed]
        row["dropped_payloads"] = len(dropped)
        row["link"] = {
            "outages": link.outages,
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
            _cut_order(r["model"]).get(r["cut"], -1),
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


def add_runtime(rows: list[dict], runtime: RuntimeModel, shapes: dict[str, DataShape]) -> None:
    """The modeled reduction columns of every finished row (a function of model, cut, bits and data shape);
    `shapes` learns the shape of every data set a row records."""
    for r in rows:
        if r["status"] != "done":
            continue
        if "data_shape" in r:
            recorded = r["data_shape"]
            shapes.setdefault(
                r["dataset"], DataShape(tuple(recorded["image_shape"]), recorded["num_classes"], recorded["num_train"])
            )
        shape = shapes.get(r["dataset"])
        for link in REPORT_LINKS:
            r[f"reduction_vs_cloud_only_{link}"] = None if shape is None else runtime.reduction(r, shape, link)


def write_results(out: Path, rows: list[dict]) -> None:
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})
    outputs.write_atomic(out / "results.csv", table.getvalue())


# ---------------------------------------------------------------- the report


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and the sample standard deviation (ddof=1) over seeds."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _fmt(values: list[float | None], scale: float = 100, digits: int = 1) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    mean, std = _mean_std(values)
    return f"{scale * mean:.{digits}f}" + (f" ± {scale * std:.{digits}f}" if len(values) > 1 else "")


def _group(rows: list[dict], scheme: str) -> dict[tuple, list[dict]]:
    groups = defaultdict(list)
    for r in rows:
        if r["status"] == "done" and r["scheme"] == scheme:
            groups[(r["dataset"], r["model"], r["cut"], r["bits"])].append(r)
    return groups


def _cut_order(model: str) -> dict[str, int]:
    return {name: i for i, name in enumerate(stage_names(model))}


def _table(header: list[str], lines: list[list[str]]) -> str:
    return "\n".join(
        ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        + ["| " + " | ".join(map(str, line)) + " |" for line in lines]
    )


def accuracy_table(rows: list[dict]) -> str:
    hier, e2e = _group(rows, "hierarchical"), _group(rows, "end_to_end")
    lines = []
    for (dataset, model, cut, bits), cell_rows in sorted(
        hier.items(), key=lambda kv: (kv[0][0], kv[0][1], _cut_order(kv[0][1]).get(kv[0][2], 99), kv[0][3])
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
                _fmt([r["edge_accuracy"] for r in cell_rows]),
                _fmt([r["cloud_accuracy"] for r in cell_rows]),
                _fmt([r["cloud_accuracy"] for r in reference]),
                _fmt(diffs, digits=2) if diffs else "–",
                len(cell_rows),
            ]
        )
    return _table(
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
        for (dataset, model, cut, bits), cell_rows in sorted(_group(rows, scheme).items()):
            lines.append(
                [
                    dataset,
                    model,
                    scheme,
                    cut or "(unsplit)",
                    _fmt([r["cloud_accuracy"] for r in cell_rows]),
                    f"{cell_rows[0]['payload_bytes_per_image']:,.0f}",
                    len(cell_rows),
                ]
            )
    return _table(["data set", "model", "scheme", "cut", "accuracy %", "link bytes / image (per step)", "seeds"], lines)


def bytes_runtime_table(rows: list[dict]) -> str:
    lines = []
    for (dataset, model, cut, bits), cell_rows in sorted(
        _group(rows, "hierarchical").items(),
        key=lambda kv: (kv[0][0], kv[0][1], _cut_order(kv[0][1]).get(kv[0][2], 99), kv[0][3]),
    ):
        r = cell_rows[0]
        paper = _paper_reduction(model, dataset)
        lines.append(
            [
                dataset,
                model,
                cut,
                bits,
                f"{r['payload_bytes_per_image']:,.0f}",
                f"{r['raw_bytes_per_image']:,.0f}",
                f"{r['raw_bytes_per_image'] / r['payload_bytes_per_image']:.2f}x",
                *(f"{100 * r[f'reduction_vs_cloud_only_{lk}']:.0f} %" for lk in REPORT_LINKS),
                "–" if paper is None else f"{100 * paper:.0f} % (3G)",
            ]
        )
    return _table(
        [
            "data set",
            "model",
            "cut",
            "bits",
            "payload B / image",
            "raw B / image",
            "raw / payload",
            *(f"reduction {lk}" for lk in REPORT_LINKS),
            "paper's reduction",
        ],
        lines,
    )


def outage_table(rows: list[dict]) -> str:
    hier = _group(rows, "hierarchical")
    lines = []
    for (dataset, model, cut, bits), cell_rows in sorted(_group(rows, "hierarchical_outage").items()):
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
                _fmt([x["edge_accuracy"] for x in cell_rows]),
                _fmt([x["cloud_accuracy"] for x in cell_rows]),
                _fmt([x["cloud_accuracy"] for x in clean]),
            ]
        )
    return _table(
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
    hier, e2e = _group(rows, "hierarchical"), _group(rows, "end_to_end")
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
                    scheme="hierarchical_paper",
                    accuracy=accuracy,
                    max_accuracy_drop=tolerance_pts / 100,
                    reference_accuracy=ref_acc,
                ).best
                base = costmodel.epoch_time(
                    "cloud_only",
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
                        f"{100 * saved:.0f} %" + (" (cloud-only is faster here)" if saved < 0 else ""),
                    ]
                )
            except ValueError as error:
                lines.append([dataset, model, link, "none", "–", "–", "–", str(error).split(";")[0]])
    reference_rule = (
        f"at most {tolerance_pts:g} point(s) below end-to-end training's accuracy (or below the best "
        f"cell where end-to-end did not run)"
    )
    return reference_rule, _table(
        ["data set", "model", "link", "chosen cut", "bits", "cloud exit %", "end-to-end %", "modeled reduction"], lines
    )


def plot_accuracy_vs_cut(rows: list[dict], path: Path, bits: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hier, e2e, sl = _group(rows, "hierarchical"), _group(rows, "end_to_end"), _group(rows, "split_learning")
    panels = sorted({(k[0], k[1]) for k in hier})
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.5 * max(len(panels), 1), 3.6), squeeze=False)
    for ax, (dataset, model) in zip(axes[0], panels):
        order = _cut_order(model)
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

    hier, e2e = _group(rows, "hierarchical"), _group(rows, "end_to_end")
    panels = sorted({(k[0], k[1], sweep_cut[k[1]]) for k in hier if k[2] == sweep_cut.get(k[1])})
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.5 * max(len(panels), 1), 3.6), squeeze=False)
    for ax, (dataset, model, cut) in zip(axes[0], panels):
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


def _paper_reduction(model: str, dataset: str) -> float | None:
    family = "cifar10" if "cifar" in dataset else "tiny_imagenet" if "tiny" in dataset else dataset
    return PAPER_REDUCTION.get((model.removesuffix("_tv"), family))


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
        and r.get("reduction_vs_cloud_only_3g") is not None
    ]
    fig, axes = plt.subplots(1, len(PLOT_LINKS), figsize=(4.8 * len(PLOT_LINKS), 3.8), squeeze=False)
    series = sorted({(r["dataset"], r["model"]) for r in done})
    for ax, link in zip(axes[0], PLOT_LINKS):
        for i, (dataset, model) in enumerate(series):
            for scheme, marker in (("hierarchical", "o"), ("split_learning", "x")):
                pts = [r for r in done if (r["dataset"], r["model"], r["scheme"]) == (dataset, model, scheme)]
                if not pts:
                    continue
                # Cuts far slower than cloud-only (float32 hand-offs) would squash the rest: drawn at the edge.
                xs = [max(100 * r[f"reduction_vs_cloud_only_{link}"], REDUCTION_AXIS_MIN) for r in pts]
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
                    for x, y, r in zip(xs, ys, pts):
                        ax.annotate(f"{r['cut']}/{r['bits']}b", (x, y), fontsize=5)
            paper = _paper_reduction(model, dataset)
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
            xlabel=f"modeled reduction vs cloud-only over {link} (%; ≤ {REDUCTION_AXIS_MIN} drawn at it)",
            ylabel="cloud exit − end-to-end (pts)",
            title=link,
        )
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.tight_layout()
    outputs.save_figure(fig, path, dpi=120)
    plt.close(fig)


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
        + f", edge and cloud optimizers {c.optimizer('edge')} / {c.optimizer('cloud')}; exit head "
        f"{c.head_convs} conv of {c.head_channels} channels pooled to {c.head_grid}x{c.head_grid}.",
        "- Hierarchical cells run overlapped (edge and cloud on their own devices, bit-identical to sequential); "
        "the baselines start from the same initial weights and see the same batches.",
        f"- Runtime: the cost model (`costmodel`, docs/runtime_model.md) on the paper's hardware (RTX 2080 Ti cloud, "
        f"Quadro K620 edge, modeled from XLA flop counts of each stage at width {profile.runtime_width}), batch "
        f"{c.batch_size}, the paper's per-batch schedule (`hierarchical_paper`) against `cloud_only`.",
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
        "End-to-end training of the unsplit model is what cloud-only training computes; vanilla split learning "
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


# ---------------------------------------------------------------- the command


def check_args(args, profile: GridProfile) -> tuple[list[str], list[str] | None, list[int] | None, list[str]]:
    """Validate the narrowing flags against the profile (ConfigError listing the valid choices)."""
    models = args.models or list(profile.cuts)
    bad = [m for m in models if m not in profile.cuts]
    if bad:
        raise ConfigError(
            f"--models {' '.join(bad)} is invalid for the {profile.name} profile; valid: {', '.join(profile.cuts)}"
        )
    valid_cuts = sorted({c for m in models for c in profile.cuts[m]})
    bad = [c for c in args.cuts or () if c not in valid_cuts]
    if bad:
        raise ConfigError(f"--cuts {' '.join(bad)} is invalid; valid for {', '.join(models)}: {', '.join(valid_cuts)}")
    bad = [b for b in args.bits or () if b not in VALID_BITS]
    if bad:
        raise ConfigError(f"--bits {' '.join(map(str, bad))} is invalid; valid: {', '.join(map(str, VALID_BITS))}")
    grid_bits = sorted(set(profile.bits) | set(profile.sweep_bits))
    bad = [b for b in args.bits or () if b not in grid_bits]
    if bad:
        raise ConfigError(
            f"--bits {' '.join(map(str, bad))} is not in the {profile.name} grid; valid: "
            f"{', '.join(map(str, grid_bits))}"
        )
    schemes = args.schemes or list(SCHEMES)
    bad = [s for s in schemes if s not in SCHEMES]
    if bad:
        raise ConfigError(f"--schemes {' '.join(bad)} is invalid; valid: {', '.join(SCHEMES)}")
    if args.seeds < 1:
        raise ConfigError(f"--seeds {args.seeds} is invalid; valid: an integer >= 1")
    if not (math.isfinite(args.tolerance_pts) and args.tolerance_pts >= 0):
        raise ConfigError(f"--tolerance-pts {args.tolerance_pts} is invalid; valid: a finite number >= 0")
    return models, args.cuts, args.bits, schemes


def check_grid_dir(out: Path, profile: GridProfile) -> None:
    """A DIR holds one profile's grid: refuse to mix another profile's cells into it."""
    marker = out / "grid.json"
    if marker.exists():
        grid = json.loads(marker.read_text())
        recorded = grid.get("profile")
        if recorded != profile.name:
            raise UserError(
                f"--out {out} holds a grid of the {recorded!r} profile; a {profile.name!r} grid needs "
                f"another --out (results of two profiles are never mixed)"
            )
        current = dataclasses.asdict(profile.config)
        # A field added since the grid was started had its default value then (as train.check_resumable).
        there = {**json.loads(json.dumps(dataclasses.asdict(ExperimentConfig()))), **grid.get("config", {})}
        changed = [
            f"{k} ({there.get(k)!r} there, {v!r} now)"
            for k, v in current.items()
            if k not in RUN_ONLY_FIELDS and json.loads(json.dumps(v)) != there.get(k)
        ]
        if changed:
            raise UserError(
                f"--out {out} holds a {profile.name} grid made with other settings: "
                + "; ".join(changed)
                + "; use another --out"
            )
    elif out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out} is not empty and holds no grid (no grid.json); choose another directory")


def load_datasets(specs: list[str], explicit: bool, data_dir: str) -> tuple[dict[str, ImageDataset], list[str]]:
    """Load every data set; an unprepared one is skipped with its reason, unless it was named explicitly."""
    loaded, skipped = {}, []
    for spec in specs:
        try:
            loaded[spec] = load_dataset(spec, data_dir=data_dir or None)
        except UserError as error:
            if explicit:
                raise
            skipped.append(f"data set {spec}: {cli.one_line(error)}")
    return loaded, skipped


@cli.entry_point
def main(argv: list[str]) -> list[dict]:
    process.setup()
    profiles = grid_profiles()
    parser = cli.Parser(description=__doc__)
    parser.add_argument("--profile", required=True, help=f"the budget: {', '.join(profiles)}")
    parser.add_argument("--out", required=True, help="the grid's directory (rerun the same command to resume)")
    parser.add_argument(
        "--dataset",
        nargs="+",
        default=None,
        help="data sets (default: the profile's): cifar10, tiny_imagenet, digits, folder:PATH",
    )
    parser.add_argument("--models", nargs="+", default=None, help="narrow the grid to these models")
    parser.add_argument("--cuts", nargs="+", default=None, help="narrow the grid to these cuts")
    parser.add_argument(
        "--bits",
        nargs="+",
        type=int,
        default=None,
        help="narrow the hierarchical cells to these bit widths (the baselines always run)",
    )
    parser.add_argument("--schemes", nargs="+", default=None, help=f"narrow the grid: {', '.join(SCHEMES)}")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per cell (the report gives mean ± std)")
    parser.add_argument(
        "--tolerance-pts",
        type=float,
        default=1.0,
        help="the chosen cut's cloud exit may be at most this many points below end-to-end",
    )
    parser.add_argument("--edge-device", default=None, help="where the edge trains (default: auto)")
    parser.add_argument("--cloud-device", default=None, help="where the cloud trains (default: auto)")
    parser.add_argument("--data-dir", default="", help="tfds data directory (default: tfds's own)")
    args = parser.parse_args(argv)
    if args.profile not in profiles:
        raise ConfigError(f"--profile {args.profile!r} is invalid; valid: {', '.join(profiles)}")
    profile = profiles[args.profile]
    devices = {k: v for k, v in (("edge_device", args.edge_device), ("cloud_device", args.cloud_device)) if v}
    profile = dataclasses.replace(profile, config=dataclasses.replace(profile.config, **devices))
    models, cuts, bits, schemes = check_args(args, profile)
    specs = args.dataset or list(profile.datasets)
    for spec in specs:  # every field of every cell, before any data is loaded
        for model in models:
            validate(dataclasses.replace(profile.config, model=model, dataset=spec, split=profile.sweep_cut[model]))
    if not plan(profile, specs, models, cuts, bits, schemes, args.seeds):
        raise ConfigError("the flags leave no cell to run (--models, --cuts, --bits and --schemes together)")
    out = Path(args.out)
    check_grid_dir(out, profile)
    datasets, skipped = load_datasets(specs, explicit=args.dataset is not None, data_dir=args.data_dir)
    if not datasets:
        raise UserError("no data set is ready: " + "; ".join(skipped))
    cells = plan(profile, list(datasets), models, cuts, bits, schemes, args.seeds)
    out.mkdir(parents=True, exist_ok=True)
    outputs.write_json(
        out / "grid.json",
        {"profile": profile.name, "description": profile.description, "config": dataclasses.asdict(profile.config)},
    )
    command = "python -m experiments.paper " + shlex.join(argv)
    return run_grid(out, profile, cells, datasets, skipped, args.tolerance_pts, command)


def run_grid(
    out: Path,
    profile: GridProfile,
    cells: list[Cell],
    datasets: dict[str, ImageDataset],
    skipped: list[str],
    tolerance_pts: float,
    command: str,
) -> list[dict]:
    """Run every cell not yet done, rewriting results.csv after each; then the report."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    todo = [c for c in cells if not (out / "cells" / c.name / "result.json").exists()]
    print(
        f"{profile.name} grid in {out}: {len(cells)} cells, {len(cells) - len(todo)} already done, "
        f"{len(todo)} to run; rerun this command to resume after a stop",
        flush=True,
    )
    shapes = {dataset_key(spec): DataShape.of(ds) for spec, ds in datasets.items()}
    runtime = RuntimeModel(out, profile)
    for dataset, model in sorted({(dataset_key(c.dataset), c.model) for c in cells}):
        print(
            f"runtime model: profiling {model} at width {profile.runtime_width} on {dataset}'s shapes "
            f"(cached in {runtime.dir})",
            flush=True,
        )
        runtime.devices(model, shapes[dataset])

    def rewrite_results() -> list[dict]:
        rows = load_rows(out)
        add_runtime(rows, runtime, shapes)
        write_results(out, rows)
        return rows

    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc="grid", unit="cell")
    durations = []
    try:
        for i, cell in enumerate(todo):
            cell_dir = out / "cells" / cell.name
            cell_dir.mkdir(parents=True, exist_ok=True)
            bar.set_postfix_str(cell.name)
            t0 = time.perf_counter()
            try:
                row = run_cell(cell, profile, datasets[cell.dataset], cell_dir)
            except RunInterrupted as stopped:
                raise RunInterrupted(
                    stopped.step, stopped.checkpoint, f"; resume the grid with the same command ({command})"
                ) from None
            except Exception as error:  # noqa: BLE001 - a crashed cell is recorded; the grid goes on
                message = f"{type(error).__name__}: {cli.one_line(error)}"
                outputs.write_json(cell_dir / "error.json", {"error": message, "traceback": traceback.format_exc()})
                bar.write(
                    f"cell {cell.name} failed: {message} (recorded in {cell_dir / 'error.json'}; "
                    f"the grid goes on, and a rerun retries it)",
                    file=sys.stderr,
                )
            else:
                (cell_dir / "error.json").unlink(missing_ok=True)
                outputs.write_json(cell_dir / "result.json", row)
                durations.append(time.perf_counter() - t0)
                left = (len(todo) - i - 1) * float(np.mean(durations))
                edge = "–" if row["edge_accuracy"] is None else f"{row['edge_accuracy']:.4f}"
                bar.write(
                    f"[{len(cells) - len(todo) + i + 1}/{len(cells)}] {cell.name}: edge {edge}, cloud "
                    f"{row['cloud_accuracy']:.4f} ({durations[-1]:.0f} s; about {left / 60:.0f} min left)"
                )
            bar.update()
            rewrite_results()
    finally:
        bar.close()
    rows = rewrite_results()
    write_report(
        out, profile, rows, cells, skipped, runtime, shapes, tolerance_pts, time.perf_counter() - started, command
    )
    print(f"wrote {out / 'results.csv'}, {out / 'REPORT.md'} and its figures")
    return rows


if __name__ == "__main__":
    main()
