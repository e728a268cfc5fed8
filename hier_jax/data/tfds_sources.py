"""tfds-backed sources (cifar10, tiny_imagenet), loaded whole into uint8 arrays.

Preparation is never implicit: without `download=True` an unprepared data set fails
at once (a check of the prepared files in data_dir, no network) with the command
that prepares it, instead of tfds retrying a download for minutes on an offline host.
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
import threading
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from hier_jax.data.core import ImageDataset, channel_stats
from hier_jax.errors import UserError

CIFAR10_CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
"""tfds cifar10's label order (that of the original release); tfds only knows the names once prepared."""

_READ_BATCH = 8192


class DatasetNotPreparedError(UserError, FileNotFoundError):
    """The data set's files are not in data_dir and downloading was not requested (a user error:
    the experiments print it as one line with the command that prepares it)."""


_TEMPDIR_LOCK = threading.RLock()


@contextlib.contextmanager
def no_stray_tempdirs() -> Iterator[None]:
    """While inside, the temporary directories tfds makes for a builder's metadata are removed on exit.

    A builder whose data_dir holds no dataset_info.json yet (an unprepared data set, or one about to
    be prepared) runs `DatasetInfo.initialize_from_bucket`, which makes a `tempfile.mkdtemp("tfds")`
    directory for metadata from GCS and never removes it (with GCS access off, as it is by default,
    it stays empty): every such builder would leave a /tmp/tmp*tfds directory behind. Inside this
    context those directories are made in one scratch directory, removed when it exits.
    """
    from tensorflow_datasets.core import dataset_info

    with _TEMPDIR_LOCK:
        saved = getattr(dataset_info, "tempfile", None)
        if saved is None:  # a tfds that no longer makes them this way
            yield
            return
        with tempfile.TemporaryDirectory(prefix="hier_jax-tfds-") as scratch:
            dataset_info.tempfile = types.SimpleNamespace(mkdtemp=functools.partial(tempfile.mkdtemp, dir=scratch))
            try:
                yield
            finally:
                dataset_info.tempfile = saved


def _split_arrays(builder: tfds.core.DatasetBuilder, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The whole split in file order (batched reads; batch_size=-1 crashes TF under tfds mocking)."""
    reader = builder.as_dataset(split=split, batch_size=_READ_BATCH, shuffle_files=False)  # pyright: ignore[reportCallIssue] - tfds's logging decorator hides the parameters
    batches = list(tfds.as_numpy(reader))
    images = np.concatenate([b["image"] for b in batches]).astype(np.uint8, copy=False)
    return images, np.concatenate([b["label"] for b in batches]).astype(np.int32)


def _require_prepared(builder: tfds.core.DatasetBuilder, how: str) -> None:
    if not builder.is_prepared():
        raise DatasetNotPreparedError(
            f"{builder.name} is not prepared: no dataset_info.json in {builder.data_path} "
            f"(nothing is downloaded without download=True).\nTo prepare it: {how}"
        )


def _to_dataset(
    builder: tfds.core.DatasetBuilder,
    name: str,
    test_split: str,
    class_names: tuple[str, ...],
    augmentation: str,
) -> ImageDataset:
    train_images, train_labels = _split_arrays(builder, "train")
    test_images, test_labels = _split_arrays(builder, test_split)
    mean, std = channel_stats(train_images)
    return ImageDataset(
        name=name,
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        class_names=class_names,
        mean=mean,
        std=std,
        augmentation=augmentation,
    )


def load_cifar10(data_dir: str | Path | None = None, *, download: bool = False) -> ImageDataset:
    """CIFAR-10 from tfds (50k train / 10k test, 32x32x3)."""
    with no_stray_tempdirs():
        builder = tfds.builder("cifar10", data_dir=None if data_dir is None else str(data_dir))
        if download:
            builder.download_and_prepare()
    dir_arg = "" if data_dir is None else f", data_dir={str(data_dir)!r}"
    _require_prepared(
        builder,
        f"on a machine with internet, run load_dataset('cifar10'{dir_arg}, download=True) "
        "(or tfds.builder('cifar10', data_dir=...).download_and_prepare()) and copy the data_dir here; "
        "offline, use an image folder instead: load_dataset('folder:PATH') "
        "with PATH/{train,test}/<class>/*.jpg.",
    )
    return _to_dataset(builder, "cifar10", "test", CIFAR10_CLASS_NAMES, "pad_crop_flip")


def load_tiny_imagenet(
    data_dir: str | Path | None = None, *, download: bool = False, manual_dir: str | Path | None = None
) -> ImageDataset:
    """Tiny ImageNet from the hier_jax builder; its validation split serves as the test set.

    download=True builds it from tiny-imagenet-200.zip (or the extracted folder) in
    `manual_dir` (default: data_dir/downloads/manual); nothing is fetched from the network.
    """
    from hier_jax.data.tiny_imagenet import TinyImagenet

    with no_stray_tempdirs():
        builder = TinyImagenet(data_dir=None if data_dir is None else str(data_dir))
        if download:
            config = tfds.download.DownloadConfig(manual_dir=None if manual_dir is None else str(manual_dir))
            builder.download_and_prepare(download_config=config)
    data_arg = "" if data_dir is None else f" --data-dir {data_dir}"
    _require_prepared(
        builder,
        "put tiny-imagenet-200.zip (or its extracted folder) in DIR and run "
        f"`python -m hier_jax.data.tiny_imagenet --manual-dir DIR{data_arg}` "
        "(or load_dataset('tiny_imagenet', data_dir=..., download=True, manual_dir=DIR)).",
    )
    names = builder.info.metadata.get("class_names") or builder.info.features["label"].names  # pyright: ignore[reportOptionalMemberAccess, reportIndexIssue, reportOptionalSubscript] - tfds types info.metadata and info.features loosely
    return _to_dataset(builder, "tiny_imagenet", "validation", tuple(names), "crop_flip")
