"""Tiny ImageNet (200 classes, 64x64) as a tfds builder, built offline from the official archive.

Tiny ImageNet is not in the tfds catalog and its download host is unreliable, so the
builder takes the archive as a manual download: `tiny-imagenet-200.zip`, or its
extracted `tiny-imagenet-200/` folder, in tfds's manual_dir. It reads either form
directly (no extraction of 120k files) and stores the original JPEG bytes (no
re-encoding; greyscale JPEGs decode to 3 channels at load time). Labels index the
sorted wnids; class names come from words.txt and are kept in the data set's metadata.

Prepare once:  python -m hier_jax.data.tiny_imagenet --manual-dir DIR [--data-dir D]
"""

from __future__ import annotations

import argparse
import io
import zipfile
from collections.abc import Iterator
from pathlib import Path

import tensorflow_datasets as tfds
from PIL import Image, UnidentifiedImageError

ARCHIVE = "tiny-imagenet-200.zip"
FOLDER = "tiny-imagenet-200"
IMAGE_SIZE = 64

_MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download {ARCHIVE} (http://cs231n.stanford.edu/{ARCHIVE}) and place it, or the folder
{FOLDER}/ extracted from it (train/<wnid>/images/*.JPEG, val/images/*.JPEG,
val/val_annotations.txt, wnids.txt, words.txt), in the manual directory, then run
  python -m hier_jax.data.tiny_imagenet --manual-dir DIR [--data-dir TFDS_DATA_DIR]
or load_dataset("tiny_imagenet", data_dir=..., download=True, manual_dir=DIR).
"""


class _ArchiveTree:
    """The official file tree, read from the zip or from the extracted folder alike."""

    def __init__(self, location: Path) -> None:
        self.location = location
        self._zip = zipfile.ZipFile(location) if location.is_file() else None
        if self._zip is not None:
            marker = min((n for n in self._zip.namelist() if n.endswith("wnids.txt")), key=len, default=None)
            if marker is None:
                raise FileNotFoundError(f"{location} holds no wnids.txt: not the Tiny ImageNet archive")
            self._prefix = marker.removesuffix("wnids.txt")
            self._names = self._zip.namelist()
        elif not (location / "wnids.txt").is_file():
            raise FileNotFoundError(f"{location} holds no wnids.txt: not the Tiny ImageNet folder")

    def read(self, relative: str) -> bytes:
        if self._zip is not None:
            try:
                return self._zip.read(self._prefix + relative)
            except KeyError:
                raise FileNotFoundError(f"{self.location} lacks {relative}") from None
        return (self.location / relative).read_bytes()

    def images(self, relative_dir: str) -> list[str]:
        """Sorted relative paths of the *.JPEG files directly in `relative_dir`."""
        if self._zip is not None:
            start = f"{self._prefix}{relative_dir}/"
            return sorted(
                n[len(self._prefix) :]
                for n in self._names
                if n.startswith(start) and "/" not in n[len(start) :] and n.upper().endswith(".JPEG")
            )
        folder = self.location / relative_dir
        return sorted(f"{relative_dir}/{p.name}" for p in folder.glob("*") if p.suffix.upper() == ".JPEG")

    def describe(self, relative: str) -> str:
        return f"{self.location}:{relative}" if self._zip is not None else str(self.location / relative)


def find_archive(manual_dir: Path) -> Path:
    """The zip or the extracted folder inside `manual_dir` (or `manual_dir` itself)."""
    for candidate in (manual_dir / ARCHIVE, manual_dir / FOLDER, manual_dir):
        if candidate.is_file() or (candidate / "wnids.txt").is_file():
            return candidate
    raise FileNotFoundError(f"no {ARCHIVE} or {FOLDER}/ in {manual_dir}.\n{_MANUAL_DOWNLOAD_INSTRUCTIONS}")


def _lines(tree: _ArchiveTree, relative: str) -> list[str]:
    return [line for line in tree.read(relative).decode("utf-8").splitlines() if line.strip()]


class TinyImagenet(tfds.core.GeneratorBasedBuilder):
    """Tiny ImageNet: 100k train and 10k validation 64x64 images of 200 ImageNet classes."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Built from the official tiny-imagenet-200.zip."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Tiny ImageNet (CS231n): 200 classes, 500 train and 50 validation images each.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(),  # names (wnids) are set from wnids.txt
                    "file_name": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://www.kaggle.com/c/tiny-imagenet",
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        tree = _ArchiveTree(find_archive(Path(dl_manager.manual_dir)))
        wnids = sorted(_lines(tree, "wnids.txt"))
        words = dict(line.split("\t", 1) for line in _lines(tree, "words.txt"))
        self.info.features["label"].names = wnids  # pyright: ignore[reportIndexIssue, reportOptionalSubscript] - tfds features are untyped
        self.info.metadata["class_names"] = [words.get(wnid, wnid).strip() for wnid in wnids]  # pyright: ignore[reportOptionalSubscript] - set in _info
        train = [(path, wnid) for wnid in wnids for path in tree.images(f"train/{wnid}/images")]
        val_labels = {}
        for line in _lines(tree, "val/val_annotations.txt"):
            name, wnid = line.split("\t")[:2]
            val_labels[name] = wnid
        validation = []
        for path in tree.images("val/images"):
            name = path.rsplit("/", 1)[-1]
            if name not in val_labels:
                raise ValueError(f"{tree.describe(path)} has no entry in val/val_annotations.txt")
            validation.append((path, val_labels[name]))
        for split, examples in (("train", train), ("validation", validation)):
            if not examples:
                raise ValueError(f"no {split} images in {tree.location}")
        unknown = sorted({wnid for _, wnid in validation} - set(wnids))
        if unknown:
            raise ValueError(
                f"val/val_annotations.txt in {tree.location} names wnids missing from wnids.txt: {unknown[:5]}"
            )
        return {
            "train": self._generate_examples(tree, train),
            "validation": self._generate_examples(tree, validation),
        }

    def _generate_examples(self, tree: _ArchiveTree, examples: list[tuple[str, str]]) -> Iterator[tuple[str, dict]]:
        for path, wnid in examples:
            data = tree.read(path)
            try:
                with Image.open(io.BytesIO(data)) as image:  # header only: cheap validation
                    size, image_format = image.size, image.format
            except (UnidentifiedImageError, OSError) as error:
                raise ValueError(f"corrupt image file {tree.describe(path)}: {error}") from error
            if size != (IMAGE_SIZE, IMAGE_SIZE) or image_format != "JPEG":
                raise ValueError(
                    f"{tree.describe(path)} is a {size} {image_format}, expected a {IMAGE_SIZE}x{IMAGE_SIZE} JPEG"
                )
            yield path, {"image": data, "label": wnid, "file_name": path.rsplit("/", 1)[-1]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build tfds tiny_imagenet from the official archive.")
    parser.add_argument("--manual-dir", required=True, help=f"folder holding {ARCHIVE} or {FOLDER}/")
    parser.add_argument("--data-dir", default=None, help="tfds data directory (default: tfds's)")
    args = parser.parse_args(argv)
    from hier_jax.data.tfds_sources import no_stray_tempdirs

    with no_stray_tempdirs():
        builder = TinyImagenet(data_dir=args.data_dir)
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=args.manual_dir))
    print(f"prepared {builder.data_path}: {builder.info.splits}")


if __name__ == "__main__":
    main()
