"""Data sets for hier-jax: one `ImageDataset` type, one batching interface.

Design (for speed on small hosts):
- Every source is decoded once into uint8 NumPy arrays in host memory (CIFAR-10:
  180 MB, Tiny ImageNet train: 1.2 GB); image folders also cache the decoded arrays
  on disk (.npz) so the slow JPEG decode happens once per folder state.
- Per step the host only gathers a uint8 index batch (4x fewer bytes than float32)
  and `device_put`s it; uint8->float32, normalization and the random crop/flip run
  in one jitted function on the device, keyed by (seed, epoch, step), so batches are
  deterministic and the host never does per-pixel work.
- Two batches are dispatched ahead of the one yielded. JAX dispatch is asynchronous,
  so the device transforms them while the caller's step runs; no thread is needed:
  on a 2-core CPU host the pipeline alone delivers ~100k augmented CIFAR-10 images/s
  (experiments/bench_input.py), far above what a training step consumes.
- Eval batches keep a fixed shape (last batch padded, with a mask) so a jitted eval
  step compiles once.
- Sources: `digits` (scikit-learn, offline), `cifar10` (tfds), `tiny_imagenet` (a tfds
  builder over the official zip, see tiny_imagenet.py), `folder:PATH` (image folders).
- tfds is imported lazily: `digits` and image folders never import TensorFlow, and
  nothing downloads unless `download=True` is passed.
"""

from hier_jax.data.core import (
    AUGMENTATIONS,
    ImageDataset,
    augment,
    channel_stats,
    epoch_permutation,
    eval_batches,
    normalization_constants,
    num_train_steps,
    raw_train_batches,
    train_batches,
)
from hier_jax.data.registry import DATASETS, STANDARD_SHAPES, DataShape, load_dataset

__all__ = [
    "AUGMENTATIONS",
    "DATASETS",
    "STANDARD_SHAPES",
    "DataShape",
    "ImageDataset",
    "augment",
    "channel_stats",
    "epoch_permutation",
    "eval_batches",
    "load_dataset",
    "normalization_constants",
    "num_train_steps",
    "raw_train_batches",
    "train_batches",
]
