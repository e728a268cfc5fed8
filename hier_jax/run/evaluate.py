"""Accuracy of both exits on a test split."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hier_jax import steps
from hier_jax.run.hierarchy import Hierarchy


def evaluate(
    h: Hierarchy, edge_state: steps.State, cloud_state: steps.State, batches: Iterable[tuple[Any, Any, Any]]
) -> dict[str, float]:
    """Accuracy of the early exit (the edge alone, as when the link is down) and of the final exit:
    {"edge_accuracy": float, "cloud_accuracy": float, "examples": int}.

    `batches` yields (images, labels, mask); masked-out (padding) examples are not counted. The
    cloud sees the features quantized at the training bit width, as it would in deployment.
    """
    edge_preds, cloud_preds, labels_all, masks = [], [], [], []
    for images, labels, mask in batches:
        edge_logits, payload = h.edge_eval(edge_state, jax.device_put(images, h.edge_device))
        cloud_logits = h.cloud_eval(cloud_state, jax.device_put(payload, h.cloud_device))
        edge_preds.append(jnp.argmax(edge_logits, -1))
        cloud_preds.append(jnp.argmax(cloud_logits, -1))
        labels_all.append(labels)
        masks.append(mask)
    edge_preds, cloud_preds, labels_all, masks = (
        np.concatenate(jax.device_get(x)) if x else np.zeros(0) for x in (edge_preds, cloud_preds, labels_all, masks)
    )
    masks = masks.astype(bool)
    n = int(masks.sum())
    if n == 0:
        raise ValueError("evaluation got no examples")
    return {
        "edge_accuracy": float(((edge_preds == labels_all) & masks).sum()) / n,
        "cloud_accuracy": float(((cloud_preds == labels_all) & masks).sum()) / n,
        "examples": n,
    }
