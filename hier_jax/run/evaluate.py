"""Test accuracy, one way for every exit and baseline: `accuracy` over (a logits function, batches).

The hierarchy's two exits come from one pass (`evaluate`): the edge's eval step gives the early
exit's logits and the payload, quantized at the training bit width as in deployment, from which the
cloud's eval step gives the final exit's. Baselines and the Ray workers call `accuracy` with their
own logits functions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hier_jax import steps
from hier_jax.run.hierarchy import Hierarchy

Logits = Callable[[Any], Any]
"""inputs -> logits, or {exit name: logits} for several exits of one pass."""


def accuracy(logits_fn: Logits, batches: Iterable[tuple[Any, Any, Any]]) -> dict[str, float]:
    """The share of unmasked examples each exit classifies right: {"accuracy"} for one exit or
    {"NAME_accuracy"} per named exit, and "examples". `batches` yields (inputs, labels, mask);
    masked-out (padding) examples are not counted. Every batch is dispatched before any result is
    fetched (once, at the end), so the devices never wait on the host."""
    predictions: dict[str, list] = {}
    labels_all, masks = [], []
    for inputs, labels, mask in batches:
        out = logits_fn(inputs)
        for name, logits in (out if isinstance(out, dict) else {"": out}).items():
            predictions.setdefault(name, []).append(jnp.argmax(logits, -1))
        labels_all.append(labels)
        masks.append(mask)
    predictions, labels_all, masks = jax.device_get((predictions, labels_all, masks))
    mask = np.concatenate(masks).astype(bool) if masks else np.zeros(0, bool)
    n = int(mask.sum())
    if n == 0:
        raise ValueError("evaluation got no examples")
    labels_host = np.concatenate(labels_all)
    return {
        (f"{name}_accuracy" if name else "accuracy"): float(((np.concatenate(p) == labels_host) & mask).sum()) / n
        for name, p in predictions.items()
    } | {"examples": n}


def evaluate(
    h: Hierarchy, edge_state: steps.State, cloud_state: steps.State, batches: Iterable[tuple[Any, Any, Any]]
) -> dict[str, float]:
    """Accuracy of the early exit (the edge alone, as when the link is down) and of the final exit:
    {"edge_accuracy", "cloud_accuracy", "examples"}."""

    def both_exits(images):
        edge_logits, payload = h.edge_eval(edge_state, jax.device_put(images, h.edge_device))
        return {"edge": edge_logits, "cloud": h.cloud_eval(cloud_state, jax.device_put(payload, h.cloud_device))}

    return accuracy(both_exits, batches)
