"""The modeled runtime columns of the grid: each cell's reduction against cloud-only training on the paper's hardware, from a cached profile of its model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hier_jax.data import ImageDataset
from hier_jax.link import get_link
from hier_jax.models import ExitHeadConfig, build_model
from hier_jax.paper.profiles import GridProfile
from hier_jax.runtime_model import costmodel, profiler, selection
from hier_jax.runtime_model.hardware import paper_devices

REPORT_LINKS = ("3g", "4g", "5g", "wifi")
PAPER_REDUCTION = {
    ("vgg16", "cifar10"): 0.29,
    ("resnet18", "cifar10"): 0.61,
    ("vgg16", "tiny_imagenet"): 0.25,
    ("resnet18", "tiny_imagenet"): 0.81,
}


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


def paper_reduction(model: str, dataset: str) -> float | None:
    family = "cifar10" if "cifar" in dataset else "tiny_imagenet" if "tiny" in dataset else dataset
    return PAPER_REDUCTION.get((model.removesuffix("_tv"), family))
