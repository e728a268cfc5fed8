"""Data layer: the common interface, batching, augmentation, and the offline digits set."""

from __future__ import annotations

import re
import tempfile
import time
import zipfile
from pathlib import Path
from unittest import mock

import jax
import numpy as np
import pytest
from PIL import Image

from hier_jax.data import (
    ImageDataset,
    channel_stats,
    epoch_permutation,
    eval_batches,
    load_dataset,
    normalization_constants,
    num_train_steps,
    train_batches,
)


def make_dataset(augmentation: str, num_train: int = 70, num_test: int = 23, size: int = 8) -> ImageDataset:
    """Random but distinct images, so every augmented image can be traced to its original."""
    rng = np.random.default_rng(0)
    train = rng.integers(1, 256, (num_train, size, size, 3), dtype=np.uint8)
    test = rng.integers(0, 256, (num_test, size, size, 3), dtype=np.uint8)
    mean, std = channel_stats(train)
    return ImageDataset(
        name="synthetic",
        train_images=train,
        train_labels=rng.integers(0, 5, num_train).astype(np.int32),
        test_images=test,
        test_labels=rng.integers(0, 5, num_test).astype(np.int32),
        class_names=tuple("abcde"),
        mean=mean,
        std=std,
        augmentation=augmentation,
    )


def normalized(ds: ImageDataset, images: np.ndarray) -> np.ndarray:
    mean, inv_std = normalization_constants(ds)
    return (images.astype(np.float32) - mean) * inv_std


def collect_train(ds: ImageDataset, batch_size: int, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    batches = [(np.asarray(x), np.asarray(y)) for x, y in train_batches(ds, batch_size, **kwargs)]
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


def test_digits_offline_shapes_and_split(digits: ImageDataset) -> None:
    assert digits.num_train + digits.num_test == 1797
    assert (digits.num_train, digits.num_test) == (1437, 360)
    assert digits.image_shape == (32, 32, 3) and digits.num_classes == 10
    assert digits.train_images.dtype == np.uint8 and digits.train_labels.dtype == np.int32
    assert digits.augmentation == "none"
    # Stratified: every class is 1/10 of the test split, to within one image.
    assert np.all(np.abs(np.bincount(digits.test_labels, minlength=10) - 36) <= 1)
    # Grey replicated to 3 channels; nearest upsampling gives 4x4 constant blocks.
    image = digits.train_images[0]
    assert np.array_equal(image[..., 0], image[..., 2])
    assert np.array_equal(image[::4, ::4, 0].repeat(4, 0).repeat(4, 1), image[..., 0])
    assert len(np.unique(digits.train_images)) <= 17
    # The split is fixed: loading again gives the same arrays.
    again = load_dataset("digits")
    assert np.array_equal(again.test_images, digits.test_images)
    assert np.array_equal(again.train_labels, digits.train_labels)


def test_digits_batches_shapes_dtypes(digits: ImageDataset) -> None:
    steps = num_train_steps(digits, 128)
    assert steps == 1437 // 128
    batches = list(train_batches(digits, 128, seed=0))
    assert len(batches) == steps
    images, labels = batches[0]
    assert images.shape == (128, 32, 32, 3) and images.dtype == np.float32
    assert labels.shape == (128,) and labels.dtype == np.int32
    # Normalized with the train statistics: roughly zero mean, unit std.
    x = np.concatenate([np.asarray(b[0]) for b in batches])
    assert abs(x.mean()) < 0.1 and abs(x.std() - 1) < 0.1
    images, labels, mask = next(iter(eval_batches(digits, 100)))
    assert images.shape == (100, 32, 32, 3) and images.dtype == np.float32
    assert labels.dtype == np.int32 and mask.dtype == np.bool_


def test_unknown_spec_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="digits.*cifar10.*tiny_imagenet.*folder:PATH"):
        load_dataset("mnist")


def test_eval_covers_test_set_exactly_once_without_augmentation() -> None:
    ds = make_dataset("pad_crop_flip")
    batches = [tuple(np.asarray(a) for a in b) for b in eval_batches(ds, 10)]
    assert len(batches) == 3 and all(b[0].shape == (10, 8, 8, 3) for b in batches)
    images, labels, mask = (np.concatenate(parts) for parts in zip(*batches, strict=False))
    assert mask.sum() == ds.num_test and mask[: ds.num_test].all() and not mask[ds.num_test :].any()
    assert np.array_equal(labels[mask], ds.test_labels)
    np.testing.assert_array_equal(images[mask], normalized(ds, ds.test_images))


def test_train_without_augmentation_is_a_permutation_of_normalized_originals() -> None:
    ds = make_dataset("none")
    images, labels = collect_train(ds, 16, seed=3, epoch=1)
    order = epoch_permutation(ds.num_train, 3, 1)[: len(labels)]
    assert len(labels) == num_train_steps(ds, 16) * 16 == 64  # drop_remainder
    assert np.array_equal(labels, ds.train_labels[order])
    np.testing.assert_array_equal(images, normalized(ds, ds.train_images[order]))


def test_train_augmentation_is_pad_crop_flip_of_the_originals() -> None:
    ds = make_dataset("pad_crop_flip")
    images, labels = collect_train(ds, 16, seed=0)
    order = epoch_permutation(ds.num_train, 0, 0)[: len(labels)]
    assert np.array_equal(labels, ds.train_labels[order])
    pad = 4
    params = []  # the (dy, dx, flip) that reproduces each augmented image
    for got, index in zip(images, order, strict=False):
        padded = np.pad(ds.train_images[index], ((pad, pad), (pad, pad), (0, 0)))
        matches = [
            (dy, dx, flip)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            for flip in (False, True)
            for crop in [padded[dy : dy + 8, dx : dx + 8]]
            if np.array_equal(normalized(ds, crop[:, ::-1] if flip else crop), got)
        ]
        assert len(matches) == 1, f"train image {index} is not exactly one crop/flip of its original"
        params.append(matches[0])
    dys, dxs, flips = zip(*params, strict=False)
    assert set(dys) == set(dxs) == set(range(2 * pad + 1))  # every offset occurs, the extremes included
    assert 0 < sum(flips) < len(flips)
    assert params[:16] != params[16:32]  # each step draws fresh randomness


def test_train_is_deterministic_per_seed_and_epoch() -> None:
    ds = make_dataset("pad_crop_flip")
    first = collect_train(ds, 16, seed=1, epoch=0)
    same = collect_train(ds, 16, seed=1, epoch=0)
    assert np.array_equal(first[0], same[0]) and np.array_equal(first[1], same[1])
    other_epoch = collect_train(ds, 16, seed=1, epoch=1)
    other_seed = collect_train(ds, 16, seed=2, epoch=0)
    assert not np.array_equal(first[0], other_epoch[0])
    assert not np.array_equal(first[0], other_seed[0])
    assert not np.array_equal(epoch_permutation(70, 1, 0), epoch_permutation(70, 1, 1))
    assert not np.array_equal(epoch_permutation(70, 1, 0), epoch_permutation(70, 2, 0))


def test_batches_on_a_device_and_sharded_over_devices() -> None:
    ds = make_dataset("pad_crop_flip")
    devices = jax.devices("cpu")
    assert len(devices) == 2  # conftest forces two CPU devices, beside any accelerator
    images, labels = next(iter(train_batches(ds, 16, seed=0, device=devices[1])))
    assert images.devices() == {devices[1]} and labels.devices() == {devices[1]}
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    sharded = next(iter(train_batches(ds, 16, seed=0, device=sharding)))[0]
    assert sharded.sharding.is_equivalent_to(sharding, 4)
    single = next(iter(train_batches(ds, 16, seed=0)))[0]
    np.testing.assert_array_equal(np.asarray(sharded), np.asarray(single))
    x, y, mask = next(iter(eval_batches(ds, 16, device=sharding)))
    assert x.sharding.is_equivalent_to(sharding, 4) and mask.sharding.is_equivalent_to(sharding, 1)


def test_invalid_batch_sizes() -> None:
    ds = make_dataset("none")
    with pytest.raises(ValueError, match="batch_size"):
        train_batches(ds, 71, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        eval_batches(ds, 0)


def test_dataset_validates_arrays() -> None:
    ds = make_dataset("none")
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(**{**ds.__dict__, "train_images": ds.train_images.astype(np.float32)})
    with pytest.raises(ValueError, match="augmentation"):
        ImageDataset(**{**ds.__dict__, "augmentation": "mixup"})


# --- tfds sources -------------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR10 = REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg"
CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@pytest.fixture
def no_download():
    """Fail the test if anything tries to download or prepare a tfds data set."""
    import tensorflow_datasets as tfds

    attempt = AssertionError("download attempted")
    with mock.patch.object(tfds.core.DatasetBuilder, "download_and_prepare", side_effect=attempt):
        yield


def test_cifar10_through_tfds_mock(tmp_path: Path) -> None:
    import tensorflow_datasets as tfds

    # mock_data serves random examples but points data_dir at metadata the pip package
    # lacks, so the builder would report "not prepared": declare it prepared.
    prepared = mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", return_value=True)
    with tfds.testing.mock_data(num_examples=24), prepared:
        ds = load_dataset("cifar10", data_dir=tmp_path)
    assert ds.name == "cifar10" and ds.class_names == CIFAR10_NAMES
    assert (ds.num_train, ds.num_test, ds.image_shape) == (24, 24, (32, 32, 3))
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
    assert ds.augmentation == "pad_crop_flip" and 0 <= ds.train_labels.min() and ds.train_labels.max() < 10
    assert len(np.unique(ds.train_images)) > 100  # real (random) pixels came through
    images, labels = next(iter(train_batches(ds, 8, seed=0)))
    assert images.shape == (8, 32, 32, 3) and labels.shape == (8,)


def test_cifar10_not_prepared_fails_fast_with_instructions(tmp_path: Path, no_download) -> None:
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as error:
        load_dataset("cifar10", data_dir=tmp_path)
    assert time.perf_counter() - start < 30
    message = str(error.value)
    assert str(tmp_path) in message and "not prepared" in message
    assert "download=True" in message and "download_and_prepare" in message and "folder:" in message


def test_tfds_builders_leave_no_temporary_directories(tmp_path: Path, monkeypatch, no_download) -> None:
    # tfds makes a tempfile.mkdtemp("tfds") directory for every builder of an unprepared data set
    # (DatasetInfo.initialize_from_bucket) and never removes it; the sources must clean up after it.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    for spec in ("cifar10", "tiny_imagenet"):
        with pytest.raises(FileNotFoundError, match="not prepared"):
            load_dataset(spec, data_dir=tmp_path / "data")
    assert sorted(p.name for p in scratch.iterdir()) == []


# --- Tiny ImageNet builder ----------------------------------------------------------------

TINY_WNIDS = ("n03", "n01", "n02")  # deliberately unsorted in wnids.txt
TINY_WORDS = {
    "n01": "goldfish, Carassius auratus",
    "n02": "tabby, tabby cat",
    "n03": "school bus",
    "n09": "unused",
}
TINY_VAL = tuple((f"val_{i}.JPEG", wnid) for i, wnid in enumerate(("n03", "n01", "n02", "n01", "n03")))


def tiny_value(wnid: str, index: int) -> int:
    """A flat grey level that encodes (class, index) and survives JPEG."""
    return 30 + 60 * (int(wnid[1:]) - 1) + 8 * index


def make_tiny_imagenet(root: Path) -> Path:
    """A miniature official tree: 3 wnids x 3 train images, 5 validation images (some greyscale)."""
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("".join(f"{w}\n" for w in TINY_WNIDS))
    (root / "words.txt").write_text("".join(f"{w}\t{words}\n" for w, words in TINY_WORDS.items()))
    for wnid in TINY_WNIDS:
        images = root / "train" / wnid / "images"
        images.mkdir(parents=True)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for i in range(3):
            pixels = np.full((64, 64, 3), tiny_value(wnid, i), np.uint8)
            Image.fromarray(pixels).save(images / f"{wnid}_{i}.JPEG", quality=95)
    for i, (name, wnid) in enumerate(TINY_VAL):
        mode_shape = (64, 64) if i % 2 else (64, 64, 3)  # Tiny ImageNet has greyscale JPEGs
        pixels = np.full(mode_shape, tiny_value(wnid, i), np.uint8)
        Image.fromarray(pixels).save(root / "val" / "images" / name, quality=95)
    annotations = "".join(f"{name}\t{wnid}\t0\t0\t63\t63\n" for name, wnid in TINY_VAL)
    (root / "val" / "val_annotations.txt").write_text(annotations)
    return root


@pytest.fixture(scope="module")
def tiny_manual_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("tiny")
    tree = make_tiny_imagenet(base / "extracted" / "tiny-imagenet-200")
    (base / "zipped").mkdir()
    with zipfile.ZipFile(base / "zipped" / "tiny-imagenet-200.zip", "w") as archive:
        for path in sorted(tree.rglob("*")):
            archive.write(path, path.relative_to(tree.parent))
    return {"extracted": base / "extracted", "zip": base / "zipped"}


@pytest.mark.parametrize("form", ["zip", "extracted"])
def test_tiny_imagenet_builds_from_archive(form: str, tiny_manual_dirs: dict[str, Path], tmp_path: Path) -> None:
    ds = load_dataset("tiny_imagenet", data_dir=tmp_path, download=True, manual_dir=tiny_manual_dirs[form])
    assert ds.class_names == ("goldfish, Carassius auratus", "tabby, tabby cat", "school bus")  # sorted wnids
    assert (ds.num_train, ds.num_test, ds.image_shape) == (9, 5, (64, 64, 3))
    assert ds.augmentation == "crop_flip"
    sorted_wnids = sorted(TINY_WNIDS)
    train_values = {tiny_value(w, i): sorted_wnids.index(w) for w in TINY_WNIDS for i in range(3)}
    for image, label in zip(ds.train_images, ds.train_labels, strict=False):
        value = min(train_values, key=lambda v: abs(v - int(image.mean())))
        assert abs(value - int(image.mean())) <= 2 and train_values[value] == label
    val_values = sorted((tiny_value(w, i), sorted_wnids.index(w)) for i, (_, w) in enumerate(TINY_VAL))
    got = sorted((round(float(x.mean())), int(y)) for x, y in zip(ds.test_images, ds.test_labels, strict=False))
    assert [label for _, label in got] == [label for _, label in val_values]
    assert all(abs(a - b) <= 2 for (a, _), (b, _) in zip(got, val_values, strict=False))
    from hier_jax.data.tiny_imagenet import TinyImagenet

    info = TinyImagenet(data_dir=str(tmp_path)).info
    assert {name: split.num_examples for name, split in info.splits.items()} == {"train": 9, "validation": 5}
    assert info.features["label"].names == sorted(TINY_WNIDS)
    # Prepared: loads again without download or manual_dir, names restored from the metadata.
    again = load_dataset("tiny_imagenet", data_dir=tmp_path)
    assert again.class_names == ds.class_names and np.array_equal(again.test_labels, ds.test_labels)


def test_tiny_imagenet_not_prepared_or_missing_archive(tmp_path: Path) -> None:
    start = time.perf_counter()
    command = "python -m hier_jax.data.tiny_imagenet --manual-dir"
    with pytest.raises(FileNotFoundError, match=command) as error:
        load_dataset("tiny_imagenet", data_dir=tmp_path / "data")
    assert time.perf_counter() - start < 30 and str(tmp_path / "data") in str(error.value)
    (tmp_path / "manual").mkdir()
    (tmp_path / "manual" / "README").write_text("not the archive")
    with pytest.raises(FileNotFoundError, match="tiny-imagenet-200.zip") as error:
        load_dataset("tiny_imagenet", data_dir=tmp_path / "data", download=True, manual_dir=tmp_path / "manual")
    assert str(tmp_path / "manual") in str(error.value)


# --- image folders ------------------------------------------------------------------------

FOLDER_CLASSES = ("cat", "ant", "bee")  # created unsorted; labels follow sorted names


def make_folder(root: Path, per_class: dict[str, int], size: int = 16) -> dict[str, list[tuple[np.ndarray, str, str]]]:
    """train/ and test/ trees of PNGs (lossless) and JPEGs; returns what was written per split."""
    rng = np.random.default_rng(1)
    written: dict[str, list[tuple[np.ndarray, str]]] = {}
    for split, count in per_class.items():
        written[split] = []
        for name in FOLDER_CLASSES:
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                # Smooth (a colour plus a gradient) so JPEG keeps it close; distinct per image.
                ramp = np.add.outer(np.arange(size), np.arange(size))[..., None] * 2
                pixels = (rng.integers(20, 180, (1, 1, 3)) + ramp).astype(np.uint8)
                suffix = ".png" if i % 2 == 0 else ".jpg"
                Image.fromarray(pixels).save(root / split / name / f"{i:03d}{suffix}")
                written[split].append((pixels, name, suffix))
    return written


def test_image_folder_png_and_jpg(tmp_path: Path) -> None:
    written = make_folder(tmp_path / "imgs", {"train": 4, "test": 3})
    ds = load_dataset(f"folder:{tmp_path / 'imgs'}", cache_dir=tmp_path / "cache")
    assert ds.name == "imgs" and ds.class_names == ("ant", "bee", "cat")
    assert (ds.num_train, ds.num_test, ds.image_shape) == (12, 9, (16, 16, 3))
    assert ds.augmentation == "pad_crop_flip"
    for split in ("train", "test"):
        images, labels = getattr(ds, f"{split}_images"), getattr(ds, f"{split}_labels")
        # Label order is sorted class names; within a class, file order (sort is stable).
        by_class = sorted(written[split], key=lambda item: sorted(FOLDER_CLASSES).index(item[1]))
        for position, (image, label, (pixels, name, suffix)) in enumerate(zip(images, labels, by_class, strict=False)):
            assert ds.class_names[label] == name
            if suffix == ".png":
                np.testing.assert_array_equal(image, pixels)
            else:  # lossy, but close to this image and no other
                errors = [np.abs(image.astype(int) - other).mean() for other, _, _ in by_class]
                assert errors[position] == min(errors) < 4
    mean, std = channel_stats(ds.train_images)
    assert ds.mean == pytest.approx(mean) and ds.std == pytest.approx(std)


def test_image_folder_cache_is_used_and_invalidated(tmp_path: Path) -> None:
    import hier_jax.data.folder as folder

    make_folder(tmp_path / "imgs", {"train": 2, "val": 1})  # val/ serves as the test split
    spec, cache = f"folder:{tmp_path / 'imgs'}", tmp_path / "cache"
    first = load_dataset(spec, cache_dir=cache)
    assert first.num_test == 3 and len(list(cache.glob("*.npz"))) == 1
    with mock.patch.object(folder, "_decode_all", side_effect=AssertionError("decoded despite cache")):
        cached = load_dataset(spec, cache_dir=cache)
    assert np.array_equal(cached.train_images, first.train_images) and cached.class_names == first.class_names
    assert cached.mean == first.mean
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "imgs" / "train" / "ant" / "999.png")
    changed = load_dataset(spec, cache_dir=cache)
    assert changed.num_train == first.num_train + 1 and len(list(cache.glob("*.npz"))) == 2


def test_missing_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_dataset(f"folder:{missing}", cache_dir=tmp_path / "cache")


def test_empty_folders_are_named(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(ValueError, match=re.escape(str(root)) + ".*train/"):
        load_dataset(f"folder:{root}", cache_dir=tmp_path / "cache")
    (root / "train").mkdir()
    (root / "test").mkdir()
    with pytest.raises(ValueError, match="no class folders in " + re.escape(str(root / "train"))):
        load_dataset(f"folder:{root}", cache_dir=tmp_path / "cache")
    (root / "train" / "ant").mkdir()
    (root / "train" / "ant" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="no images .* " + re.escape(str(root / "train" / "ant"))):
        load_dataset(f"folder:{root}", cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_corrupt_image_is_named(tmp_path: Path, content: bytes) -> None:
    make_folder(tmp_path / "imgs", {"train": 2, "test": 1})
    bad = tmp_path / "imgs" / "test" / "bee" / "broken.png"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match="corrupt.*" + re.escape(str(bad))):
        load_dataset(f"folder:{tmp_path / 'imgs'}", cache_dir=tmp_path / "cache")


def test_mixed_image_sizes_are_named(tmp_path: Path) -> None:
    make_folder(tmp_path / "imgs", {"train": 2, "test": 1})
    odd = tmp_path / "imgs" / "train" / "cat" / "big.png"
    Image.fromarray(np.zeros((20, 16, 3), np.uint8)).save(odd)
    with pytest.raises(ValueError, match=re.escape(str(odd))):
        load_dataset(f"folder:{tmp_path / 'imgs'}", cache_dir=tmp_path / "cache")


def test_shared_cifar10_jpeg_folder() -> None:
    if not SHARED_CIFAR10.is_dir():
        pytest.skip(f"{SHARED_CIFAR10} absent (it exists only beside the project checkout)")
    # Default cache dir: the first run decodes 60k JPEGs (~25 s), later runs load the .npz.
    ds = load_dataset(f"folder:{SHARED_CIFAR10}")
    assert ds.class_names == CIFAR10_NAMES
    assert (ds.num_train, ds.num_test, ds.image_shape) == (50_000, 10_000, (32, 32, 3))
    assert np.array_equal(np.bincount(ds.train_labels), [5000] * 10)
    assert np.array_equal(np.bincount(ds.test_labels), [1000] * 10)
    assert np.all(np.diff(ds.test_labels) >= 0)  # in folder order: airplane=0 ... truck=9
    assert ds.mean == pytest.approx((123.6, 121.6, 112.0), abs=3)  # the README's sample statistics
    assert ds.std == pytest.approx((62.7, 62.1, 66.3), abs=3)
    images, labels = next(iter(train_batches(ds, 128, seed=0)))
    assert images.shape == (128, 32, 32, 3) and len(np.unique(np.asarray(labels))) > 5
