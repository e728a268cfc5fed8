"""The paper's baselines, trained under the same supervision as the hierarchy (`threads.run_pairs`):
end-to-end training of the unsplit model on one device, and vanilla split learning."""

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
from hier_jax.run.supervisor import Snapshot
from hier_jax.run.threads import PairStep, RunResult, run_pairs


@dataclasses.dataclass(frozen=True)
class Baseline:
    """Compiled steps of a baseline: end-to-end training of the unsplit model, or vanilla split learning.

    Both run under the same supervision as `threads.run_sequential` (snapshots, divergence checks, Ctrl-C),
    over an (edge state, cloud state) pair. End-to-end trains on one device and has no edge: the whole
    model is the cloud state, and the edge state `{"step": 0}` is a placeholder nothing updates.
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


def _baseline_pair_step(b: Baseline) -> PairStep:
    if b.train_step is not None:

        def end_to_end(edge_state, cloud_state, images, labels):
            assert b.train_step is not None  # b is frozen: still the one checked above
            cloud_state, metrics = b.train_step(
                cloud_state, jax.device_put(images, b.cloud_device), jax.device_put(labels, b.cloud_device)
            )
            return edge_state, cloud_state, {}, metrics, 0

        return end_to_end

    def split_learning(edge_state, cloud_state, images, labels):
        # no train_step: split learning, built with all three
        assert b.edge_forward is not None and b.cloud_step is not None and b.edge_backward is not None
        features, edge_vjp, batch_stats = b.edge_forward(edge_state, jax.device_put(images, b.edge_device))
        cloud_state, boundary_grad, metrics = b.cloud_step(
            cloud_state, jax.device_put(features, b.cloud_device), jax.device_put(labels, b.cloud_device)
        )
        edge_state = b.edge_backward(edge_state, edge_vjp, batch_stats, jax.device_put(boundary_grad, b.edge_device))
        return edge_state, cloud_state, {}, metrics, features.nbytes + boundary_grad.nbytes

    return split_learning


def run_baseline(
    b: Baseline,
    edge_state: steps.State,
    cloud_state: steps.State,
    batches: Iterable[tuple[Any, Any]],
    *,
    start_step: int = 0,
    snapshot_every: int = 0,
    on_snapshot: Callable[[Snapshot], None] | None = None,
    timeout_s: float | None = None,
    progress: bool = False,
) -> RunResult:
    """Train a baseline over `batches`, supervised as `threads.run_sequential` is, and return the same
    `threads.RunResult` (its `mode` left "", as the runner's are: `train.train` sets it). The metrics are
    the final exit's (`cloud_metrics`; `edge_metrics` is empty); `payload_bytes` is the arrays that cross
    the link per batch (split learning: float32 features up plus their gradient down; end-to-end: 0, the
    raw images are the cloud's input)."""
    name = "end-to-end" if b.train_step is not None else "split learning"
    return run_pairs(
        _baseline_pair_step(b),
        (b.edge_device, b.cloud_device),
        edge_state,
        cloud_state,
        batches,
        name,
        start_step=start_step,
        snapshot_every=snapshot_every,
        on_snapshot=on_snapshot,
        timeout_s=timeout_s,
        progress=progress,
    )


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
