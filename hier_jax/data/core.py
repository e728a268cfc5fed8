"""The common data-set type, batching, and on-device augmentation.

Every source decodes once to uint8 arrays held in host memory; the host then only
gathers uint8 index batches, and conversion, normalization and augmentation run
in one jitted JAX function on the target device.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

AUGMENTATIONS: dict[str, int | None] = {
    "pad_crop_flip": 4,  # CIFAR: zero-pad 4 px, random 32x32 crop, horizontal flip
    "crop_flip": 8,  # Tiny ImageNet: zero-pad 8 px, random 64x64 crop, horizontal flip
    "none": None,  # e.g. digits: not mirror symmetric, so no flips
}
"""Augmentation name -> padding in pixels of the random crop (None: no augmentation)."""

Placement = jax.Device | jax.sharding.Sharding | None
"""Where batches go: a device, a sharding of the batch axis, or the default device."""

_PREFETCH = 2
"""Batches dispatched ahead of the one yielded, so host gathers overlap device work."""


@dataclasses.dataclass(frozen=True, eq=False)
class ImageDataset:
    """A fully decoded image-classification data set (uint8 images, int32 labels).

    eq=False: identity equality and hashing (field-wise == on arrays is ambiguous).
    """

    name: str
    train_images: np.ndarray  # uint8 [N, H, W, C]
    train_labels: np.ndarray  # int32 [N]
    test_images: np.ndarray  # uint8 [M, H, W, C]
    test_labels: np.ndarray  # int32 [M]
    class_names: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, 0..255 scale
    std: tuple[float, ...]
    augmentation: str  # a key of AUGMENTATIONS

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if images.dtype != np.uint8 or images.ndim != 4:
                raise ValueError(
                    f"{self.name}: {split}_images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}"
                )
            if labels.dtype != np.int32 or labels.shape != images.shape[:1]:
                raise ValueError(
                    f"{self.name}: {split}_labels must be int32 [{images.shape[0]}], got {labels.dtype} {labels.shape}"
                )
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise ValueError(
                f"{self.name}: train and test image shapes differ: "
                f"{self.train_images.shape[1:]} vs {self.test_images.shape[1:]}"
            )
        if self.augmentation not in AUGMENTATIONS:
            raise ValueError(f"{self.name}: unknown augmentation {self.augmentation!r}; valid: {sorted(AUGMENTATIONS)}")
        channels = self.train_images.shape[-1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"{self.name}: mean/std need {channels} entries")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.train_images.shape[1:])  # type: ignore[return-value]

    @property
    def num_train(self) -> int:
        return int(self.train_images.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.test_images.shape[0])


def channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std on the 0..255 scale, in float64 chunks (no full float copy)."""
    channels = images.shape[-1]
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    for start in range(0, images.shape[0], chunk):
        block = images[start : start + chunk].reshape(-1, channels).astype(np.float64)
        total += block.sum(0)
        total_sq += np.square(block).sum(0)
    count = images.size // channels
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def normalization_constants(ds: ImageDataset) -> tuple[np.ndarray, np.ndarray]:
    """(mean, 1/std) as float32: normalization is (x - mean) * (1/std), reproducible in NumPy."""
    mean = np.asarray(ds.mean, np.float32)
    inv_std = np.float32(1.0) / np.asarray(ds.std, np.float32)
    return mean, inv_std


def epoch_permutation(num: int, seed: int, epoch: int) -> np.ndarray:
    """The training order of one epoch: a function of (seed, epoch) only."""
    return np.random.default_rng((seed, epoch)).permutation(num)


def num_train_steps(ds: ImageDataset, batch_size: int) -> int:
    """Steps per epoch; the last partial batch is dropped."""
    return ds.num_train // batch_size


def _normalize(images: jax.Array, mean: tuple[float, ...], inv_std: tuple[float, ...]) -> jax.Array:
    x = images.astype(jnp.float32)
    return (x - jnp.asarray(mean, jnp.float32)) * jnp.asarray(inv_std, jnp.float32)


@functools.partial(jax.jit, static_argnames=("mean", "inv_std"))
def _eval_transform(images: jax.Array, mean: tuple[float, ...], inv_std: tuple[float, ...]) -> jax.Array:
    return _normalize(images, mean, inv_std)


@functools.partial(jax.jit, static_argnames=("mean", "inv_std", "pad"))
def _train_transform(
    images: jax.Array,
    counters: jax.Array | np.ndarray,
    mean: tuple[float, ...],
    inv_std: tuple[float, ...],
    pad: int | None,
) -> jax.Array:
    """uint8 batch -> normalized float32, with a random zero-pad crop and flip per image.

    `counters` = (seed, epoch, step) as uint32, so the key is derived on device.
    """
    if pad is None:
        return _normalize(images, mean, inv_std)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(counters[0]), counters[1]), counters[2])
    k_y, k_x, k_flip = jax.random.split(key, 3)
    batch, height, width, channels = images.shape
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    dy = jax.random.randint(k_y, (batch,), 0, 2 * pad + 1)
    dx = jax.random.randint(k_x, (batch,), 0, 2 * pad + 1)
    crop = jax.vmap(lambda img, y, x: jax.lax.dynamic_slice(img, (y, x, 0), (height, width, channels)))
    cropped = crop(padded, dy, dx)
    flip = jax.random.bernoulli(k_flip, 0.5, (batch,))
    cropped = jnp.where(flip[:, None, None, None], cropped[:, :, ::-1, :], cropped)
    return _normalize(cropped, mean, inv_std)


def _place(array: np.ndarray, device: Placement) -> jax.Array:
    return jax.device_put(array, device) if device is not None else jnp.asarray(array)


def _prefetched(batches: Iterator[tuple]) -> Iterator[tuple]:
    """Keep `_PREFETCH` batches dispatched ahead: JAX dispatch is async, so the device
    computes them while the consumer runs its step and the host gathers the next."""
    queue: collections.deque = collections.deque()
    for batch in batches:
        queue.append(batch)
        if len(queue) > _PREFETCH:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def raw_train_batches(
    ds: ImageDataset, batch_size: int, *, seed: int, epoch: int = 0, start: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """One epoch of (images uint8 [B,H,W,C], labels int32 [B], counters): the batches as stored, before
    any transform, and the (seed, epoch, step) counters `augment` takes; what a cloud-only edge uploads."""
    if batch_size <= 0 or batch_size > ds.num_train:
        raise ValueError(f"batch_size must be in 1..{ds.num_train} (train size of {ds.name}), got {batch_size}")
    order = epoch_permutation(ds.num_train, seed, epoch)

    def generate() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        for step in range(start, num_train_steps(ds, batch_size)):
            index = order[step * batch_size : (step + 1) * batch_size]
            counters = np.array([v & 0xFFFFFFFF for v in (seed, epoch, step)], np.uint32)
            yield ds.train_images[index], ds.train_labels[index], counters

    return generate()


def augment(ds: ImageDataset, images: jax.Array, counters: jax.Array | np.ndarray) -> jax.Array:
    """A raw training batch, normalized and augmented as `train_batches` does it (on `images`' device)."""
    mean, inv_std = (tuple(float(v) for v in a) for a in normalization_constants(ds))
    return _train_transform(images, counters, mean, inv_std, AUGMENTATIONS[ds.augmentation])


def train_batches(
    ds: ImageDataset, batch_size: int, *, seed: int, epoch: int = 0, device: Placement = None, start: int = 0
) -> Iterator[tuple[jax.Array, jax.Array]]:
    """One epoch of (images float32 [B,H,W,C] normalized and augmented, labels int32 [B]).

    Shuffled by (seed, epoch), last partial batch dropped, deterministic for (seed, epoch); `start`
    skips the epoch's first batches (a resumed run), which are never gathered or transformed.
    """
    raw = raw_train_batches(ds, batch_size, seed=seed, epoch=epoch, start=start)

    def generate() -> Iterator[tuple[jax.Array, jax.Array]]:
        for images, labels, counters in raw:
            yield augment(ds, _place(images, device), counters), _place(labels, device)

    return _prefetched(generate())


def eval_batches(
    ds: ImageDataset, batch_size: int, *, device: Placement = None
) -> Iterator[tuple[jax.Array, jax.Array, jax.Array]]:
    """(images, labels, mask) covering every test image exactly once, in order.

    The last batch is zero-padded to `batch_size` (fixed shapes: one compilation) with mask False.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    mean, inv_std = (tuple(float(v) for v in a) for a in normalization_constants(ds))

    def generate() -> Iterator[tuple[jax.Array, jax.Array, jax.Array]]:
        for start in range(0, ds.num_test, batch_size):
            images = ds.test_images[start : start + batch_size]
            labels = ds.test_labels[start : start + batch_size]
            mask = np.ones(batch_size, bool)
            if (missing := batch_size - len(labels)) > 0:
                images = np.concatenate([images, np.zeros((missing, *images.shape[1:]), np.uint8)])
                labels = np.concatenate([labels, np.zeros(missing, np.int32)])
                mask[-missing:] = False
            images = _eval_transform(_place(images, device), mean, inv_std)
            yield images, _place(labels, device), _place(mask, device)

    return _prefetched(generate())
