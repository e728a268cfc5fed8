"""`digits`: scikit-learn's bundled 8x8 handwritten digits, the offline quickstart data set.

1,797 images with 17 grey levels (0..16) ship inside scikit-learn, so this needs no
download. They are scaled to 0..255, upsampled to 32x32 by nearest neighbour
(each pixel becomes a 4x4 block: exact, no invented intermediate grey levels), and
replicated to 3 channels so CIFAR-shaped models run on them unchanged.
"""

from __future__ import annotations

from typing import cast

import numpy as np

from hier_jax.data.core import ImageDataset, channel_stats

SIZE = 32
TEST_FRACTION = 0.2
SPLIT_SEED = 0


def load_digits_dataset() -> ImageDataset:
    """A fixed, seeded, stratified 80/20 train/test split (1,437 / 360 images)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    grey = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # pyright: ignore[reportAttributeAccessIssue] - a Bunch, typed as the (X, y) form; [N, 8, 8]
    scale = SIZE // grey.shape[1]
    big = np.repeat(np.repeat(grey, scale, axis=1), scale, axis=2)
    images = np.repeat(big[..., None], 3, axis=-1)
    labels = bunch.target.astype(np.int32)  # pyright: ignore[reportAttributeAccessIssue] - a Bunch, typed as the (X, y) form
    train_x, test_x, train_y, test_y = cast(  # arrays in, arrays out (sklearn types them as any array-like)
        list[np.ndarray],
        train_test_split(images, labels, test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED),
    )
    mean, std = channel_stats(train_x)
    return ImageDataset(
        name="digits",
        train_images=np.ascontiguousarray(train_x),
        train_labels=train_y,
        test_images=np.ascontiguousarray(test_x),
        test_labels=test_y,
        class_names=tuple(str(d) for d in range(10)),
        mean=mean,
        std=std,
        augmentation="none",
    )
