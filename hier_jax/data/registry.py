"""`load_dataset(spec)`: one entry point that dispatches to the sources, importing each lazily."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hier_jax.data.core import ImageDataset
from hier_jax.errors import ConfigError

DATASETS = ("digits", "cifar10", "tiny_imagenet", "folder:PATH")
"""Valid `spec` values for `load_dataset`."""


@dataclasses.dataclass(frozen=True)
class DataShape:
    """What a model and the runtime model need of a data set: image shape, classes, training examples."""

    image_shape: tuple[int, ...]
    num_classes: int
    num_train: int

    @classmethod
    def of(cls, dataset: ImageDataset) -> DataShape:
        return cls(tuple(dataset.image_shape), dataset.num_classes, dataset.num_train)


STANDARD_SHAPES = {"cifar10": DataShape((32, 32, 3), 10, 50_000), "tiny_imagenet": DataShape((64, 64, 3), 200, 100_000)}
"""The paper's data sets, known without loading them (benchmarks and the runtime model on random inputs)."""


def load_dataset(
    spec: str,
    data_dir: str | Path | None = None,
    *,
    download: bool = False,
    manual_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    augmentation: str | None = None,
) -> ImageDataset:
    """Load a data set fully into memory as uint8 arrays.

    spec: "digits" | "cifar10" | "tiny_imagenet" | "folder:PATH".
    data_dir: the tfds data directory (cifar10, tiny_imagenet; default: tfds's own).
    download: let tfds download and prepare cifar10, or build tiny_imagenet from
        `manual_dir`; without it, unprepared data fails fast with instructions.
    cache_dir: where image folders cache decoded arrays (default ~/.cache/hier_jax).
    augmentation: override the source's default (a key of `AUGMENTATIONS`).
    """
    ds = _load(spec, data_dir, download=download, manual_dir=manual_dir, cache_dir=cache_dir)
    return dataclasses.replace(ds, augmentation=augmentation) if augmentation is not None else ds


def _load(
    spec: str,
    data_dir: str | Path | None,
    *,
    download: bool,
    manual_dir: str | Path | None,
    cache_dir: str | Path | None,
) -> ImageDataset:
    if spec == "digits":
        from hier_jax.data.digits import load_digits_dataset

        return load_digits_dataset()
    if spec == "cifar10":
        from hier_jax.data.tfds_sources import load_cifar10

        return load_cifar10(data_dir, download=download)
    if spec == "tiny_imagenet":
        from hier_jax.data.tfds_sources import load_tiny_imagenet

        return load_tiny_imagenet(data_dir, download=download, manual_dir=manual_dir)
    if spec.startswith("folder:") and len(spec) > len("folder:"):
        from hier_jax.data.folder import load_image_folder

        return load_image_folder(spec.removeprefix("folder:"), cache_dir=cache_dir)
    raise ConfigError(f"unknown data set {spec!r}; valid: {', '.join(DATASETS)}")
