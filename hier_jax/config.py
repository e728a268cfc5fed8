"""One experiment configuration (a frozen dataclass) and the CLI conventions every experiment shares.

Each field becomes a flag of the same name (underscores as dashes: --model, --dataset, --split,
--bits, --batch-size, --out, ...; --batch is an alias of --batch-size, as in the benchmarks); an
experiment passes its own defaults and may add flags of its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    model: str = "resnet18"          # vgg16 | resnet18 | resnet18_tv
    dataset: str = "digits"          # digits | cifar10 | tiny_imagenet | folder:PATH
    split: str = "layer1_1"          # separation point: the last edge stage
    bits: int = 4                    # 1..8 quantized, 16 bfloat16, 32 float32
    width: int = 64                  # first-stage channels; 64 is the paper's size
    batch_size: int = 128
    epochs: int = 1
    max_steps: int = 0               # > 0: stop after this many steps in all
    learning_rate: float = 0.05      # both sides (cosine decay over the run)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    head_channels: int = 128         # early-exit head: conv channels
    head_convs: int = 1              # early-exit head: 3x3 conv-BN-ReLU layers
    head_grid: int = 4               # early-exit head: average-pool to grid x grid cells
    edge_device: str = "cpu:0"
    cloud_device: str = "cpu:1"
    queue_size: int = 2              # payloads the edge may run ahead of the cloud
    seed: int = 0
    data_dir: str = ""               # tfds data_dir / cache dir; "" = the library default
    out: str = ""                    # output directory; "" = write nothing


ALIASES = {"batch_size": ("--batch",)}


def _field_type(field: dataclasses.Field) -> type:
    hint = typing.get_type_hints(ExperimentConfig)[field.name]
    if isinstance(hint, types.UnionType):
        hint = next(t for t in typing.get_args(hint) if t is not type(None))
    return hint


def add_config_flags(parser: argparse.ArgumentParser, defaults: ExperimentConfig = ExperimentConfig()) -> None:
    """Add one flag per config field, defaulting to `defaults`."""
    for field in dataclasses.fields(ExperimentConfig):
        parser.add_argument(f"--{field.name.replace('_', '-')}", *ALIASES.get(field.name, ()), type=_field_type(field),
                            default=getattr(defaults, field.name), help=f"(default: %(default)s)")


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    return ExperimentConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ExperimentConfig)})
