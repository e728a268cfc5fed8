"""One run record for every backend: what each side did at each step, the checkpoint metadata that
carries it, the check that a checkpoint may be resumed, and the run's metrics files.

`RunRecord` keeps, per edge, the loss, accuracy and time of every edge step, and for the cloud every
step it took in the order it took them, each naming the edge and the edge step whose payload it
trained on (a step dropped by a link outage has an edge entry and no cloud entry), and when it ended
(`done_at`, wall clock: the intervals between cloud steps are a run's step time, waits included,
which `step_s`, the step's own compute, leaves out).

Checkpoint metadata (`run_meta`, format 2) is one schema: step, total steps, scheme, schedule,
precision, the nested config (the topology, edges and order included), the position in the data and
the RNG, the record, wall time, and per-worker state (`workers`: the edges saved, their reports).
`read_meta` also reads format 1 of both former runners (the in-process runner's flat config with its
"mode" and "metrics"; the Ray runner's "cluster", "reports" and "taken"). `check_resumable` is the
one check before a resume. `write_metrics` writes one CSV layout and `plot_curves` one figure.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from hier_jax import flags, outputs
from hier_jax.config import ExperimentConfig, differences, from_dict
from hier_jax.errors import DivergenceError, ResumeMismatchError

FORMAT = 2
EDGE_FIELDS = ("step", "loss", "accuracy", "step_s")
CLOUD_FIELDS = ("edge", "step", "loss", "accuracy", "step_s", "done_at")
METRICS_COLUMNS = (
    "edge",
    "step",
    "edge_loss",
    "edge_accuracy",
    "edge_step_s",
    "cloud_index",
    "cloud_loss",
    "cloud_accuracy",
    "cloud_step_s",
    "cloud_done_at",
)
# Format 1: the Ray runner's topology fields, today the run config's.
_FORMAT1_TOPOLOGY = (
    "edges",
    "order",
    "dirichlet",
    "edge_sync",
    "max_restarts",
    "timeout_s",
    "kill_edges",
    "kill_cloud",
)
# Format 1: how the in-process runner named (scheme, schedule) in one word.
_FORMAT1_MODES = {
    "sequential": ("hierarchical", "sequential"),
    "overlapped": ("hierarchical", "pipelined"),
    "end_to_end": ("end_to_end", "sequential"),
    "split_learning": ("split_learning", "sequential"),
}


def _value(metrics: Mapping[str, Any], key: str) -> float:
    value = metrics.get(key)
    return math.nan if value is None else float(value)


@dataclasses.dataclass
class RunRecord:
    """Per edge {"step", "loss", "accuracy", "step_s"} lists (in edge-step order) and the cloud's
    {"edge", "step", "loss", "accuracy", "step_s", "done_at"} lists (in the order the cloud trained)."""

    edges: list[dict[str, list]]
    cloud: dict[str, list]

    @classmethod
    def empty(cls, edges: int = 1) -> RunRecord:
        return cls([{k: [] for k in EDGE_FIELDS} for _ in range(edges)], {k: [] for k in CLOUD_FIELDS})

    def add_edge_step(self, edge: int, step: int, metrics: Mapping[str, Any]) -> None:
        entry = self.edges[edge]
        entry["step"].append(int(step))
        for key in EDGE_FIELDS[1:]:
            entry[key].append(_value(metrics, key))

    def add_cloud_step(self, edge: int, step: int, metrics: Mapping[str, Any]) -> None:
        self.cloud["edge"].append(int(edge))
        self.cloud["step"].append(int(step))
        for key in CLOUD_FIELDS[2:]:
            self.cloud[key].append(_value(metrics, key))

    def forget_edge_steps(self, edge: int, first: int) -> None:
        """Drop edge `edge`'s steps from `first` on (an edge that restarts recomputes them)."""
        keep = [i for i, t in enumerate(self.edges[edge]["step"]) if t < first]
        self.edges[edge] = {k: [v[i] for i in keep] for k, v in self.edges[edge].items()}

    def edge_metrics(self, edge: int = 0) -> dict[str, np.ndarray]:
        entry = self.edges[edge]
        return {
            "step": np.asarray(entry["step"], np.int64),
            **{k: np.asarray(entry[k], np.float32) for k in ("loss", "accuracy")},
            "step_s": np.asarray(entry["step_s"], np.float64),
        }

    def cloud_metrics(self, edge: int | None = None) -> dict[str, np.ndarray]:
        """The cloud's steps (on `edge`'s payloads only, when given), in the order it took them."""
        pick = [i for i, e in enumerate(self.cloud["edge"]) if edge is None or e == edge]
        values = {k: [self.cloud[k][i] for i in pick] for k in CLOUD_FIELDS}
        return {
            "edge": np.asarray(values["edge"], np.int64),
            "step": np.asarray(values["step"], np.int64),
            **{k: np.asarray(values[k], np.float32) for k in ("loss", "accuracy")},
            "step_s": np.asarray(values["step_s"], np.float64),
            "done_at": np.asarray(values["done_at"], np.float64),
            "index": np.asarray(pick, np.int64),
        }

    def delivered(self, edge: int) -> set[int]:
        """The edge steps of `edge` the cloud trained on."""
        return {t for e, t in zip(self.cloud["edge"], self.cloud["step"], strict=True) if e == edge}

    def cut(self, step: int, cloud_steps: int) -> RunRecord:
        """The record a checkpoint at `step` holds: each edge's steps before `step`, and the cloud's
        first `cloud_steps` steps (those it took before the state the checkpoint saves)."""
        edges = [
            {k: [v for v, t in zip(e[k], e["step"], strict=True) if t < step] for k in EDGE_FIELDS} for e in self.edges
        ]
        return RunRecord(edges, {k: v[:cloud_steps] for k, v in self.cloud.items()})

    def joined(self, later: RunRecord) -> RunRecord:
        """This record followed by a later one (a resumed run's steps after its checkpoint's)."""
        return RunRecord(
            [{k: a[k] + b[k] for k in EDGE_FIELDS} for a, b in zip(self.edges, later.edges, strict=True)],
            {k: self.cloud[k] + later.cloud[k] for k in CLOUD_FIELDS},
        )

    def to_json(self) -> dict:
        return {"edges": self.edges, "cloud": self.cloud}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunRecord:
        """A record's JSON; a field it lacks (`done_at` before it was recorded) is NaN at every step."""
        cloud = data["cloud"]
        n = len(cloud.get("step", []))
        return cls(
            [{k: list(e.get(k, [])) for k in EDGE_FIELDS} for e in data["edges"]],
            {k: list(cloud.get(k, [math.nan] * n)) for k in CLOUD_FIELDS},
        )


def check_finite(
    side: str, step: int, loss: float, *, edge: int | None = None, last_checkpoint: Path | None = None
) -> None:
    """DivergenceError naming the side, the edge (where a run has several) and the step of a
    non-finite loss."""
    if not math.isfinite(float(loss)):
        raise DivergenceError(side, step, float(loss), last_checkpoint, edge=edge)


def tree_is_finite(tree: Any) -> bool:
    """Every floating-point leaf of a pytree of arrays (on any device, or host) is finite."""
    import jax

    return all(
        np.isfinite(np.asarray(leaf)).all()
        for leaf in jax.tree.leaves(tree)
        if np.issubdtype(np.asarray(leaf).dtype, np.inexact)
    )


# ------------------------------------------------------------------------------------ metadata


def run_meta(
    *,
    step: int,
    total_steps: int | None,
    scheme: str,
    schedule: str,
    precision: str,
    config: ExperimentConfig,
    record: RunRecord,
    wall_s: float,
    steps_per_epoch: int,
    workers: dict,
) -> dict:
    """The metadata of a checkpoint at `step` (format 2). `workers`: which edges' states it holds
    ("saved_edges") and each edge's report ("reports")."""
    meta = {
        "format": FORMAT,
        "step": step,
        "total_steps": total_steps,
        "scheme": scheme,
        "schedule": schedule,
        "precision": precision,
        "config": dataclasses.asdict(config),
        "data": {
            "epoch": step // steps_per_epoch,
            "batch_in_epoch": step % steps_per_epoch,
            "steps_per_epoch": steps_per_epoch,
            "order": "epoch_permutation(seed, epoch)",
        },
        "rng": {"seed": config.seed, "augmentation_key": "fold_in(fold_in(key(seed), epoch), batch_in_epoch)"},
        "record": record.to_json(),
        "wall_s": wall_s,
        "workers": workers,
    }
    return meta


def read_meta(meta: Mapping[str, Any]) -> dict:
    """Checkpoint metadata in the format-2 layout, whichever runner and format wrote it."""
    if meta.get("format") == FORMAT:
        return dict(meta)
    if "cluster" in meta:
        return _cluster_format1(meta)
    scheme, schedule = _FORMAT1_MODES[meta["mode"]]
    metrics = meta.get("metrics", {})
    n = len(metrics.get("edge_loss", []))
    edge = {
        "step": list(range(meta["step"] - n, meta["step"])),
        "loss": metrics.get("edge_loss", []),
        "accuracy": metrics.get("edge_accuracy", []),
        "step_s": [math.nan] * n,
    }
    cloud_steps = metrics.get("cloud_steps", [])
    cloud = {
        "edge": [0] * len(cloud_steps),
        "step": cloud_steps,
        "loss": metrics.get("cloud_loss", []),
        "accuracy": metrics.get("cloud_accuracy", []),
        "step_s": [math.nan] * len(cloud_steps),
        "done_at": [math.nan] * len(cloud_steps),
    }
    config = dataclasses.asdict(
        from_dict(ExperimentConfig, meta["config"]) if isinstance(meta["config"], dict) else ExperimentConfig()
    )
    return {
        **{k: v for k, v in meta.items() if k not in ("mode", "metrics")},
        "format": FORMAT,
        "scheme": scheme,
        "schedule": schedule,
        "config": {**config, "scheme": scheme, "schedule": schedule},
        "record": {"edges": [edge], "cloud": cloud},
        # one edge, its state saved as the checkpoint's edge item itself (not keyed by edge)
        "workers": {"saved_edges": [0], "reports": [], "bare_edge_item": True},
    }


def _cluster_format1(meta: Mapping[str, Any]) -> dict:
    """The Ray runner's format 1: its flow, links and time scale were ClusterConfig fields; each
    edge's losses and step times lived in its report, the cloud's steps in "taken"."""
    topology = dict(meta["cluster"])
    schedule = topology.pop("flow", "pipelined")
    presets, time_scale = topology.pop("links", []), topology.pop("time_scale", 1.0)
    config = from_dict(ExperimentConfig, meta["config"])
    config = flags.replace_paths(
        config,
        {
            "scheme": "hierarchical",
            "schedule": schedule,
            "link.presets": tuple(presets),
            "link.time_scale": time_scale,
            **{name: _tuple_of(topology[name]) for name in _FORMAT1_TOPOLOGY if name in topology},
        },
    )
    edges = []
    for report in meta["reports"]:
        n = len(report.get("losses", []))
        edges.append(
            {
                "step": list(range(n)),
                "loss": report.get("losses", []),
                "accuracy": [math.nan] * n,
                "step_s": report.get("step_s", [math.nan] * n),
            }
        )
    taken = sorted(meta["taken"], key=lambda m: m["index"])
    cloud = {
        "edge": [m["edge"] for m in taken],
        "step": [m["step"] for m in taken],
        "loss": [m["loss"] for m in taken],
        "accuracy": [math.nan] * len(taken),
        "step_s": [m.get("step_s", math.nan) for m in taken],
        "done_at": [math.nan] * len(taken),
    }
    reports = [{k: v for k, v in r.items() if k not in ("losses", "step_s")} for r in meta["reports"]]
    return {
        "format": FORMAT,
        "step": meta["step"],
        "total_steps": None,
        "scheme": "hierarchical",
        "schedule": schedule,
        "precision": meta.get("precision"),
        "config": dataclasses.asdict(config),
        "record": {"edges": edges, "cloud": cloud},
        "wall_s": meta.get("wall_s", 0.0),
        "workers": {"saved_edges": meta["saved_edges"], "reports": reports},
    }


def _tuple_of(value: Any) -> Any:
    """A JSON list as the tuple a config holds (pairs included)."""
    return tuple(_tuple_of(v) for v in value) if isinstance(value, list) else value


def record_of(meta: Mapping[str, Any] | None, edges: int = 1) -> RunRecord:
    """The record a checkpoint's (format-2) metadata holds; an empty one without a checkpoint."""
    return RunRecord.empty(edges) if meta is None else RunRecord.from_json(meta["record"])


def check_resumable(
    meta: Mapping[str, Any],
    *,
    config: ExperimentConfig,
    scheme: str,
    precision: str,
    total_steps: int | None,
    where: Path,
) -> None:
    """ResumeMismatchError naming what differs between this run and the (format-2) checkpoint at
    `where`: the scheme, a config field that shapes training (run-only fields such as the devices, the
    backend and the schedule may change), the resolved precision, or the run's length."""
    recorded_scheme = meta.get("scheme", "hierarchical")
    if recorded_scheme != scheme:
        raise ResumeMismatchError(
            f"cannot resume from {where}: it is a checkpoint of {recorded_scheme} training, not {scheme}"
        )
    differ = differences(config, from_dict(ExperimentConfig, meta.get("config", {})), "in the checkpoint")
    if differ:
        raise ResumeMismatchError(f"cannot resume from {where}: the config differs in " + "; ".join(differ))
    if meta.get("precision") not in (None, precision):  # "auto" resolves per backend
        raise ResumeMismatchError(
            f"cannot resume from {where}: it was trained in precision {meta['precision']}, "
            f"this run's resolves to {precision}"
        )
    if meta.get("total_steps") not in (None, total_steps):
        raise ResumeMismatchError(
            f"cannot resume from {where}: it belongs to a run of {meta['total_steps']} steps, "
            f"this one has {total_steps} (has the data set changed?)"
        )


# ---------------------------------------------------------------------------------- metrics files


def _cell(value: Any) -> Any:
    return "" if value is None or (isinstance(value, float) and not math.isfinite(value)) else value


def metrics_csv(record: RunRecord) -> str:
    """One row per edge step (each edge's, in step order) with the cloud step that trained on its
    payload (empty when it was dropped); a cloud step on no edge step (the end-to-end baseline has
    no edge) gets a row of its own."""
    cloud_of = {(e, t): i for i, (e, t) in enumerate(zip(record.cloud["edge"], record.cloud["step"], strict=True))}
    rows, seen = [], set()
    for e, entry in enumerate(record.edges):
        for j, t in enumerate(entry["step"]):
            i = cloud_of.get((e, t))
            seen.add((e, t))
            rows.append([e, t, entry["loss"][j], entry["accuracy"][j], entry["step_s"][j], *_cloud_cells(record, i)])
    for (e, t), i in cloud_of.items():
        if (e, t) not in seen:
            rows.append([e, t, None, None, None, *_cloud_cells(record, i)])
    rows.sort(key=lambda r: (r[0], r[1]))
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(METRICS_COLUMNS)
    writer.writerows([[_cell(v) for v in row] for row in rows])
    return table.getvalue()


def _cloud_cells(record: RunRecord, i: int | None) -> list:
    if i is None:
        return [None, None, None, None, None]
    cloud = record.cloud
    return [i, cloud["loss"][i], cloud["accuracy"][i], cloud["step_s"][i], cloud["done_at"][i]]


def write_metrics(path: Path, record: RunRecord) -> Path:
    return outputs.write_atomic(path, metrics_csv(record))


def plot_curves(record: RunRecord, path: Path, title: str, edge_labels: list[str], cloud_labels: list[str]) -> Path:
    """Training loss of every exit against the edge step: the early exits on the left (one line per
    edge), the cloud exit on each edge's payloads on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
    for e in range(len(record.edges)):
        edge = record.edge_metrics(e)
        if len(edge["step"]):
            left.plot(edge["step"], edge["loss"], lw=1, label=edge_labels[e])
        cloud = record.cloud_metrics(e)
        right.plot(cloud["step"], cloud["loss"], lw=1, label=cloud_labels[e])
    left.set(title="early exit (edge)", xlabel="edge step", ylabel="training loss", yscale="log")
    right.set(title="final exit (cloud)", xlabel="edge step whose payload it trained on")
    for ax in (left, right):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    outputs.save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


RUN_FILES = ("summary.json", "metrics.csv", "curves.png")


def write_run_files(
    out: Path, summary: dict, record: RunRecord, title: str, edge_labels: list[str], cloud_labels: list[str]
) -> list[str]:
    """summary.json, metrics.csv and curves.png of a run, each written atomically; the names written."""
    outputs.write_json(out / "summary.json", summary)
    write_metrics(out / "metrics.csv", record)
    plot_curves(record, out / "curves.png", title, edge_labels, cloud_labels)
    return list(RUN_FILES)
