"""One experiment configuration (a frozen dataclass) and the CLI conventions every experiment shares.

Each field becomes a flag of the same name (underscores as dashes: --model, --dataset, --split,
--bits, --batch-size, --out, ...; --batch is an alias of --batch-size, as in the benchmarks); an
experiment passes its own defaults and may add flags of its own. `validate` checks every field that
can be checked without the data (a ConfigError naming the field and its valid values), so a bad flag
fails before anything is loaded or built.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from pathlib import Path

from hier_jax.errors import ConfigError
from hier_jax.optim import SCHEDULES, OptimConfig

SIDES = ("edge", "cloud")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    model: str = "resnet18"  # vgg16 | resnet18 | resnet18_tv
    dataset: str = "digits"  # digits | cifar10 | tiny_imagenet | folder:PATH
    split: str = "layer1_1"  # separation point: the last edge stage
    bits: int = 4  # 1..8 quantized, 16 bfloat16, 32 float32
    width: int = 64  # first-stage channels; 64 is the paper's size
    precision: str = "auto"  # auto | fp32 | tf32 | bf16, both sides (hier_jax.precision; auto: bf16 on TPU)
    batch_size: int = 128
    epochs: int = 1
    max_steps: int = 0  # > 0: stop after this many steps in all
    learning_rate: float = 0.05  # both sides, unless --edge-/--cloud-learning-rate is given
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine (decay to 0 over the run) | constant; both sides unless overridden
    warmup_steps: int = 0  # linear warm-up before the cosine decay; both sides unless overridden
    nesterov: bool = False  # Nesterov momentum; both sides unless overridden
    edge_learning_rate: float | None = None  # None: --learning-rate
    edge_schedule: str | None = None  # None: --schedule
    edge_warmup_steps: int | None = None  # None: --warmup-steps
    edge_nesterov: bool | None = None  # None: --nesterov
    cloud_learning_rate: float | None = None
    cloud_schedule: str | None = None
    cloud_warmup_steps: int | None = None
    cloud_nesterov: bool | None = None
    head_channels: int = 128  # early-exit head: conv channels
    head_convs: int = 1  # early-exit head: 3x3 conv-BN-ReLU layers
    head_grid: int = 4  # early-exit head: average-pool to grid x grid cells
    edge_device: str = "auto"  # auto: the first accelerator, else host device 0 (devices.auto_devices)
    cloud_device: str = "auto"  # auto: the last accelerator, else host device 1
    queue_size: int = 2  # payloads the edge may run ahead of the cloud
    seed: int = 0
    data_dir: str = ""  # tfds data_dir / cache dir; "" = the library default
    out: str = ""  # output directory; "" = write nothing
    checkpoint_every: int = 250  # save both states every this many steps (0 = only at the end)
    keep_checkpoints: int = 3  # how many of the latest checkpoints to keep

    def optimizer(self, side: str) -> OptimConfig:
        """The optimizer of `side` ("edge" or "cloud"; the end-to-end baseline trains with the cloud's):
        the side's own fields where given, the shared ones elsewhere."""
        if side not in SIDES:
            raise ValueError(f"unknown side {side!r}; valid: {', '.join(SIDES)}")

        def own(name: str):
            value = getattr(self, f"{side}_{name}")
            return getattr(self, name) if value is None else value

        return OptimConfig(
            learning_rate=own("learning_rate"),
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            schedule=own("schedule"),
            warmup_steps=own("warmup_steps"),
            nesterov=own("nesterov"),
        )


RUN_ONLY_FIELDS = (
    "edge_device",
    "cloud_device",
    "queue_size",
    "data_dir",
    "out",
    "checkpoint_every",
    "keep_checkpoints",
)
"""Fields that do not change the training trajectory: a resumed run may give them new values."""


ALIASES = {"batch_size": ("--batch",)}


def _field_type(field: dataclasses.Field) -> type:
    hint = typing.get_type_hints(ExperimentConfig)[field.name]
    if isinstance(hint, types.UnionType):
        hint = next(t for t in typing.get_args(hint) if t is not type(None))
    return hint


def add_config_flags(parser: argparse.ArgumentParser, defaults: ExperimentConfig = ExperimentConfig()) -> None:
    """Add one flag per config field, defaulting to `defaults`."""
    for field in dataclasses.fields(ExperimentConfig):
        flag, default = f"--{field.name.replace('_', '-')}", getattr(defaults, field.name)
        if _field_type(field) is bool:  # --nesterov / --no-nesterov: argparse's type=bool takes "False" as true
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help="(default: %(default)s)"
            )
        else:
            parser.add_argument(
                flag,
                *ALIASES.get(field.name, ()),
                type=_field_type(field),
                default=default,
                help="(default: %(default)s)",
            )


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    return ExperimentConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ExperimentConfig)})


def _check(ok: bool, field: str, value: object, valid: str) -> None:
    if not ok:
        raise ConfigError(f"--{field.replace('_', '-')} {value!r} is invalid; valid: {valid}")


def check_dataset_spec(spec: str) -> None:
    """ConfigError unless `spec` names a known data set or an existing image folder (nothing is loaded)."""
    folder = spec.removeprefix("folder:") if spec.startswith("folder:") else None
    _check(
        spec in ("digits", "cifar10", "tiny_imagenet") or bool(folder),
        "dataset",
        spec,
        "digits, cifar10, tiny_imagenet, folder:PATH",
    )
    if folder is not None and not Path(folder).is_dir():
        raise ConfigError(
            f"--dataset {spec!r}: {folder} is not a directory (an image folder holds "
            f"train/CLASS/*.jpg and test/CLASS/*.jpg)"
        )


def validate(config: ExperimentConfig) -> None:
    """Check every field that needs no data; ConfigError naming the flag, the value and the valid choices."""
    from hier_jax.devices import resolve_device
    from hier_jax.models import MODELS, stage_names
    from hier_jax.precision import POLICIES
    from hier_jax.quantization import VALID_BITS

    _check(config.model in MODELS, "model", config.model, ", ".join(MODELS))
    points = stage_names(config.model)
    _check(config.split in points, "split", config.split, f"a stage of {config.model}: {', '.join(points)}")
    _check(config.bits in VALID_BITS, "bits", config.bits, ", ".join(map(str, VALID_BITS)))
    _check(config.precision in POLICIES, "precision", config.precision, ", ".join(POLICIES))
    check_dataset_spec(config.dataset)
    for field in ("width", "batch_size", "epochs", "head_channels", "head_grid", "queue_size", "keep_checkpoints"):
        value = getattr(config, field)
        _check(value >= 1, field, value, "an integer >= 1")
    for field in ("max_steps", "head_convs", "seed", "checkpoint_every"):
        value = getattr(config, field)
        _check(value >= 0, field, value, "an integer >= 0")
    for prefix in ("", "edge_", "cloud_"):
        rate, schedule, warmup = (
            getattr(config, prefix + name) for name in ("learning_rate", "schedule", "warmup_steps")
        )
        if rate is not None:
            _check(math.isfinite(rate) and rate > 0, prefix + "learning_rate", rate, "a finite number > 0")
        if schedule is not None:
            _check(schedule in SCHEDULES, prefix + "schedule", schedule, ", ".join(SCHEDULES))
        if warmup is not None:
            _check(warmup >= 0, prefix + "warmup_steps", warmup, "an integer >= 0")
    _check(0 <= config.momentum < 1, "momentum", config.momentum, "a number in [0, 1)")
    _check(
        math.isfinite(config.weight_decay) and config.weight_decay >= 0,
        "weight_decay",
        config.weight_decay,
        "a finite number >= 0",
    )
    for field in ("edge_device", "cloud_device"):
        try:
            resolve_device(getattr(config, field), field.removesuffix("_device"))
        except ValueError as error:
            raise ConfigError(f"--{field.replace('_', '-')}: {error}") from None


def explicit_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The config fields given on the command line (not left at their defaults)."""
    unset = object()
    fields = [f.name for f in dataclasses.fields(ExperimentConfig)]
    saved = {name: parser.get_default(name) for name in fields}
    parser.set_defaults(**{name: unset for name in fields})
    try:
        args = parser.parse_args(argv)
    finally:
        parser.set_defaults(**saved)
    return {name for name in fields if getattr(args, name) is not unset}
