"""Image folders: a `{split}/{class}/*.jpg|png` tree as a data set, with a decoded-array cache.

Labels follow the sorted class-folder names of `train/` (so CIFAR-10's folders give
CIFAR-10's label ids); the test split is `test/`, else `val/` or `validation/`.
Decoding tens of thousands of small JPEGs is Python-overhead bound, so it runs once
in a thread pool (Pillow releases the GIL while decoding) and the uint8 arrays are
cached as an uncompressed .npz keyed by the folder's path and every file's name,
size and mtime: any change to the tree makes a new cache entry.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from hier_jax.data.core import ImageDataset, channel_stats
from hier_jax.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
TEST_SPLITS = ("test", "val", "validation")
CACHE_VERSION = 1
_CHUNK = 256


def default_cache_dir() -> Path:
    """$HIER_JAX_CACHE, else ~/.cache/hier_jax."""
    return Path(os.environ.get("HIER_JAX_CACHE", Path.home() / ".cache" / "hier_jax"))


class ImageFolderError(UserError, ValueError):
    """An image folder that cannot be read as a data set (missing, misshapen, or with a bad image)."""


class ImageFolderMissingError(UserError, FileNotFoundError):
    """The image folder, or its train/ or test/ split, does not exist."""


Listing = list[tuple[Path, int, os.stat_result]]
"""(image file, label, its stat) for every image of a split."""


def _list_split(split_dir: Path, class_names: tuple[str, ...] | None) -> tuple[tuple[str, ...], Listing]:
    """(class names, listing) of one split; labels index `class_names` if given, else its own folders."""
    found = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())
    if not found:
        raise ImageFolderError(f"no class folders in {split_dir} (expected {split_dir}/<class>/*.jpg|png)")
    names = class_names if class_names is not None else tuple(found)
    unknown = sorted(set(found) - set(names))
    if unknown:
        raise ImageFolderError(f"class folders in {split_dir} that train/ lacks: {unknown}")
    files = []
    for label, name in enumerate(names):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue
        entries = sorted(
            (e for e in os.scandir(class_dir) if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES)),
            key=lambda e: e.name,
        )
        if not entries and class_names is None:
            raise ImageFolderError(f"no images ({'/'.join(IMAGE_SUFFIXES)}) in class folder {class_dir}")
        files.extend((Path(e.path), label, e.stat()) for e in entries)
    if not files:
        raise ImageFolderError(f"no images ({'/'.join(IMAGE_SUFFIXES)}) in {split_dir}")
    return names, files


def _decode(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageFolderError(f"corrupt or unreadable image file {path}: {error}") from error


def _decode_all(paths: list[Path]) -> np.ndarray:
    """Decode into one uint8 [N, H, W, 3] array; every image must have the first one's size."""
    first = _decode(paths[0])
    out = np.empty((len(paths), *first.shape), np.uint8)

    def fill(start: int) -> None:
        for i in range(start, min(start + _CHUNK, len(paths))):
            image = _decode(paths[i])
            if image.shape != first.shape:
                raise ImageFolderError(
                    f"image {paths[i]} is {image.shape[:2]}, but {paths[0]} is {first.shape[:2]}: "
                    "resize the folder to one size"
                )
            out[i] = image

    workers = min(8, 2 * (os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(fill, start) for start in range(0, len(paths), _CHUNK)]:
            future.result()
    return out


def _cache_key(root: Path, listing: Listing) -> str:
    digest = hashlib.sha256(f"{CACHE_VERSION}\n{root}\n".encode())
    for path, label, stat in listing:
        digest.update(f"{path.relative_to(root)}\t{label}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def _find_splits(root: Path) -> tuple[Path, Path]:
    if not root.exists():
        raise ImageFolderMissingError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise ImageFolderError(f"image folder {root} is not a directory")
    test_dirs = [root / name for name in TEST_SPLITS if (root / name).is_dir()]
    if not (root / "train").is_dir() or not test_dirs:
        present = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise ImageFolderError(
            f"image folder {root} needs train/ and one of {'/, '.join(TEST_SPLITS)}/ "
            f"(each holding <class>/*.jpg|png); found folders: {present or 'none'}"
        )
    return root / "train", test_dirs[0]


def load_image_folder(
    path: str | Path, *, cache_dir: str | Path | None = None, augmentation: str = "auto"
) -> ImageDataset:
    """Load `path/train` and `path/test` (or val/validation) into memory, using the cache.

    augmentation "auto": "pad_crop_flip" (4 px) for images up to 32 px, else "crop_flip" (8 px).
    """
    root = Path(path).expanduser().resolve()
    train_dir, test_dir = _find_splits(root)
    class_names, train_files = _list_split(train_dir, None)
    _, test_files = _list_split(test_dir, class_names)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache_file = cache / f"folder-{root.name}-{_cache_key(root, train_files + test_files)}.npz"
    if cache_file.exists():
        with np.load(cache_file) as stored:
            arrays = {name: stored[name] for name in stored.files}
    else:
        arrays = {
            "train_images": _decode_all([f for f, _, _ in train_files]),
            "train_labels": np.array([label for _, label, _ in train_files], np.int32),
            "test_images": _decode_all([f for f, _, _ in test_files]),
            "test_labels": np.array([label for _, label, _ in test_files], np.int32),
        }
        if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
            train_size, test_size = arrays["train_images"].shape[1:3], arrays["test_images"].shape[1:3]
            raise ImageFolderError(f"image folder {root}: train images are {train_size}, test images {test_size}")
        arrays["mean"], arrays["std"] = map(np.asarray, channel_stats(arrays["train_images"]))
        _write_cache(cache_file, arrays)
    if augmentation == "auto":
        augmentation = "pad_crop_flip" if max(arrays["train_images"].shape[1:3]) <= 32 else "crop_flip"
    return ImageDataset(
        name=root.name,
        train_images=arrays["train_images"],
        train_labels=arrays["train_labels"],
        test_images=arrays["test_images"],
        test_labels=arrays["test_labels"],
        class_names=class_names,
        mean=tuple(float(v) for v in arrays["mean"]),
        std=tuple(float(v) for v in arrays["std"]),
        augmentation=augmentation,
    )


def _write_cache(cache_file: Path, arrays: dict[str, np.ndarray]) -> None:
    """Atomic write (temp file + rename); an unwritable cache only costs a re-decode next time."""
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        partial = cache_file.with_name(f"{cache_file.stem}.{os.getpid()}.partial.npz")
        np.savez(partial, **arrays)  # pyright: ignore[reportArgumentType] - numpy's stub lets **kwds fill allow_pickle; these are array names
        partial.replace(cache_file)
    except OSError as error:
        warnings.warn(f"could not write decoded-image cache {cache_file}: {error}", stacklevel=3)
