"""The training split sharded over the edges: IID, or non-IID with Dirichlet label proportions."""

from __future__ import annotations

import dataclasses

import numpy as np

from hier_jax.data.core import ImageDataset


def shard_indices(labels: np.ndarray, edges: int, *, dirichlet: float = 0.0, seed: int = 0) -> list[np.ndarray]:
    """Training-example indices of each edge, disjoint and covering every example.

    IID (dirichlet 0): a seeded permutation cut into `edges` near-equal parts. Non-IID: for each class,
    its examples are split over the edges in proportions drawn from Dirichlet(alpha) (small alpha: each
    edge sees few classes), the usual federated-learning partition. Each index list is sorted.
    """
    rng = np.random.default_rng(seed)
    if dirichlet <= 0:
        return [np.sort(part) for part in np.array_split(rng.permutation(len(labels)), edges)]
    parts: list[list[np.ndarray]] = [[] for _ in range(edges)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        cuts = (np.cumsum(rng.dirichlet(np.full(edges, dirichlet))) * len(members)).astype(int)[:-1]
        for edge, part in enumerate(np.split(members, cuts)):
            parts[edge].append(part)
    return [np.sort(np.concatenate(p)) for p in parts]


def shard(dataset: ImageDataset, indices: np.ndarray, edge: int) -> ImageDataset:
    """The data set an edge trains on: its training examples, the whole test split, the same
    normalisation (the full set's mean and std, so every edge sees inputs on one scale)."""
    return dataclasses.replace(
        dataset,
        name=f"{dataset.name}[edge {edge}]",
        train_images=dataset.train_images[indices],
        train_labels=dataset.train_labels[indices],
    )
