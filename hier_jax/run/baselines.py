"""The compiled steps of the paper's baselines, which the workers run under the one scheduler like the
hierarchy's: end-to-end training of the unsplit model on one device, and vanilla split learning."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from hier_jax import steps
from hier_jax.devices import AUTO, Device, place, resolve_device
from hier_jax.models import Split
from hier_jax.run.evaluate import accuracy


@dataclasses.dataclass(frozen=True)
class Baseline:
    """Compiled steps of a baseline: end-to-end training of the unsplit model, or vanilla split learning.

    Both run as an edge and a cloud worker (`workers`) under the one scheduler, over an (edge state,
    cloud state) pair. End-to-end trains on one device and has no edge: the whole model is the cloud
    state, and the edge state `{"step": 0}` is a placeholder nothing updates.
    """

    edge_device: Device
    cloud_device: Device
    train_step: Callable | None = None  # end-to-end: (state, images, labels) -> (state, metrics)
    edge_forward: Callable | None = None  # split learning: (edge_state, images) -> (features, vjp, bn)
    cloud_step: Callable | None = None  # split learning: (cloud_state, features, labels) -> (.., grad, ..)
    edge_backward: Callable | None = None  # split learning: (edge_state, vjp, bn, grad) -> edge_state
    edge_eval: Callable | None = None  # split learning: (edge_state, images) -> features
    cloud_eval: Callable | None = None  # (cloud_state, features or images) -> logits


def build_end_to_end(
    model: Any, tx: optax.GradientTransformation, device: str | Device = AUTO
) -> tuple[Baseline, steps.State, steps.State]:
    """The unsplit model trained on one device: what cloud-only training computes. Returns
    (baseline, the placeholder edge state `{"step": 0}`, the model's state)."""
    device = resolve_device(device, "cloud")  # cloud-only training runs where the cloud does
    graphdef, state = steps.init_state(model, tx)
    policy = model.precision  # the steps trace under the policy the model was built with
    baseline = Baseline(
        device,
        device,
        train_step=jax.jit(steps.make_train_step(graphdef, tx, precision=policy), donate_argnums=0),
        cloud_eval=jax.jit(steps.make_eval(graphdef, precision=policy)),
    )
    no_edge = {"step": jax.device_put(jnp.zeros((), jnp.int32), device)}
    return baseline, no_edge, place(state, device)


def build_split_learning(
    split: Split,
    *,
    edge_tx: optax.GradientTransformation,
    cloud_tx: optax.GradientTransformation,
    edge_device: str | Device = AUTO,
    cloud_device: str | Device = AUTO,
) -> tuple[Baseline, steps.State, steps.State]:
    """Vanilla split learning: the cloud's boundary gradient goes back and the edge backpropagates it."""
    edge_device, cloud_device = resolve_device(edge_device, "edge"), resolve_device(cloud_device, "cloud")
    edge_graphdef, edge_state = steps.init_state(split.edge, edge_tx)
    cloud_graphdef, cloud_state = steps.init_state(split.cloud, cloud_tx)
    edge_policy, cloud_policy = split.edge.precision, split.cloud.precision
    baseline = Baseline(
        edge_device,
        cloud_device,
        edge_forward=jax.jit(steps.make_split_edge_forward(edge_graphdef, precision=edge_policy)),
        cloud_step=jax.jit(
            steps.make_split_cloud_step(cloud_graphdef, cloud_tx, precision=cloud_policy), donate_argnums=0
        ),
        edge_backward=jax.jit(steps.make_split_edge_backward(edge_tx, precision=edge_policy), donate_argnums=0),
        edge_eval=jax.jit(steps.make_features_eval(edge_graphdef, precision=edge_policy)),
        cloud_eval=jax.jit(steps.make_eval(cloud_graphdef, precision=cloud_policy)),
    )
    return baseline, place(edge_state, edge_device), place(cloud_state, cloud_device)


def evaluate_baseline(
    b: Baseline, edge_state: steps.State, cloud_state: steps.State, batches: Iterable[tuple[Any, Any, Any]]
) -> dict[str, float]:
    """Test accuracy of a baseline's final exit: {"cloud_accuracy", "examples"} (a baseline has no
    early exit). `batches` yields (images, labels, mask), as for `evaluate.evaluate`."""

    def final_exit(images):
        if b.edge_eval is not None:
            images = jax.device_put(b.edge_eval(edge_state, jax.device_put(images, b.edge_device)), b.cloud_device)
        assert b.cloud_eval is not None  # every baseline has one
        return {"cloud": b.cloud_eval(cloud_state, jax.device_put(images, b.cloud_device))}

    return accuracy(final_exit, batches)
