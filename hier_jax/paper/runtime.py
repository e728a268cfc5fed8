"""The modeled runtime columns of the grid: each cell's reduction against end-to-end training in the
cloud (the paper's cloud-only baseline) on the paper's hardware, from a cached profile of its model,
under both flop conventions (`runtime_model.flops`; the model's own is the conventional one)."""

from __future__ import annotations

from pathlib import Path

from hier_jax.data import DataShape
from hier_jax.link import get_link
from hier_jax.models import build_model
from hier_jax.paper.profiles import GridProfile
from hier_jax.runtime_model import costmodel, profiler, selection
from hier_jax.runtime_model.hardware import paper_devices

REPORT_LINKS = ("3g", "4g", "5g", "wifi")
XLA_SUFFIX = "_xla_flops"
"""The columns under XLA's flop count carry it: reduction_vs_end_to_end_3g_xla_flops."""


class RuntimeModel:
    """Modeled reductions against end-to-end training on the paper's hardware: one profile per model and
    data shape, at the grid's runtime width with the exit head the grid trains (cached as
    DIR/profiles/*.json)."""

    def __init__(self, out: Path, profile: GridProfile):
        self.dir, self.grid = out / "profiles", profile
        c = profile.config
        self.head = c.head
        self._profiles: dict[tuple, profiler.Profile] = {}
        self._devices: dict[tuple, tuple[profiler.Profile, profiler.Profile]] = {}

    def devices(
        self, model: str, shape: DataShape, count: str = "conventional"
    ) -> tuple[profiler.Profile, profiler.Profile]:
        """(edge, cloud) of the paper's hardware under flop convention `count`."""
        key = (model, shape.image_shape, shape.num_classes)
        if key not in self._profiles:
            h, w, c = shape.image_shape
            head = self.head
            path = self.dir / (
                f"{model}_w{self.grid.runtime_width}_{h}x{w}x{c}_{shape.num_classes}_head"
                f"{head.channels}x{head.convs}g{head.grid}_b{self.grid.config.batch_size}.json"
            )
            self._profiles[key] = profiler.cached_profile(
                path,
                lambda: build_model(
                    model, num_classes=shape.num_classes, input_shape=shape.image_shape, width=self.grid.runtime_width
                ),
                batch=2,
                repeats=1,
                warmup=0,
                head=head,
                payload_batch=self.grid.config.batch_size,
                measure_whole=False,
                progress=False,
            )
        if (key, count) not in self._devices:
            self._devices[key, count] = paper_devices(self._profiles[key], count=count)
        return self._devices[key, count]

    def reduction(self, row: dict, shape: DataShape, link: str, count: str = "conventional") -> float:
        edge, cloud = self.devices(row["model"], shape, count)
        cut = row["cut"] or self.grid.sweep_cut[row["model"]]
        w = selection.workload(
            edge, cloud, cut, row["bits"], batch=self.grid.config.batch_size, num_examples=shape.num_train
        )
        # The paper's own schedule for the hierarchical cells (the outage cell's too); the baselines as run.
        scheme = row["scheme"] if row["scheme"] in ("end_to_end", "split_learning") else "hierarchical_per_batch"
        lk = get_link(link)
        return costmodel.reduction(costmodel.epoch_time(scheme, w, lk), costmodel.epoch_time("end_to_end", w, lk))


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
            for count, suffix in (("conventional", ""), ("xla", XLA_SUFFIX)):
                r[f"reduction_vs_end_to_end_{link}{suffix}"] = (
                    None if shape is None else runtime.reduction(r, shape, link, count)
                )
