"""The grid's budgets (`GridProfile`: smoke, cpu, full) and its cells: which (data set, model, cut, bits,
scheme, seed) a profile trains, and each cell's config."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hier_jax import train
from hier_jax.config import SIDES, ExperimentConfig, optimizers
from hier_jax.data import ImageDataset, num_train_steps
from hier_jax.flags import replace_paths
from hier_jax.link import LinkConfig
from hier_jax.models import ExitHeadConfig, stage_names

SCHEMES = ("hierarchical", "end_to_end", "split_learning", "hierarchical_outage")
OUTAGE_FRACTION = 0.2  # the hierarchical_outage cell's link is down for the middle 20 % of its steps
OUTAGE_BUFFER = 2
"""The grid's kinds of cell: a training scheme, or hierarchical training with the link down for part of it."""
SHARED_CIFAR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cifar10-jpeg"


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
                **optimizers(learning_rate=0.05),
                head=ExitHeadConfig(channels=8),
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
                **optimizers(learning_rate=0.05, nesterov=True),
                head=ExitHeadConfig(channels=64),
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
                **optimizers(learning_rate=0.05, nesterov=True),
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
        scheme="hierarchical" if cell.scheme == "hierarchical_outage" else cell.scheme,
        schedule="pipelined",
    )
    if cell.scheme == "hierarchical_outage":
        config = dataclasses.replace(config, link=outage_link(train.total_steps(config, dataset)))
    if profile.warmup_epochs > 0:
        warmup = int(profile.warmup_epochs * num_train_steps(dataset, config.batch_size))
        config = replace_paths(config, {f"{side}_optimizer.warmup_steps": warmup for side in SIDES})
    return config


def outage_link(total_steps: int) -> LinkConfig:
    """A 4G link (delays scaled down 100x so it never holds the edge back) down for the middle 20 %
    of the steps, with room for 2 payloads at the edge (older ones are dropped while it is down)."""
    first = int(total_steps * (0.5 - OUTAGE_FRACTION / 2))
    last = max(first + 1, int(total_steps * (0.5 + OUTAGE_FRACTION / 2)))
    return LinkConfig(presets=("4g",), time_scale=0.01, outages=((first, last),), buffer=OUTAGE_BUFFER)


def cut_order(model: str) -> dict[str, int]:
    return {name: i for i, name in enumerate(stage_names(model))}
