"""Pure train and eval steps over plain pytree states; jit, donation and devices are the caller's.

A state is a dict {"params", "batch_stats", "opt_state", "step"} (NNX state + optax state); the
module structure (an nnx.GraphDef) is static and closed over. Steps:

- hierarchical (the paper's method): `edge_step` trains the edge on its early-exit loss alone and
  emits the quantized, packed feature map; `cloud_step` decodes it and trains the cloud. The feature
  map crosses through `quantization.encode`, which stops gradients, so the cloud's loss has no
  gradient with respect to any edge parameter.
- end-to-end (`train_step`): the unsplit model, as cloud-only training trains it.
- vanilla split learning: `split_edge_forward` -> `split_cloud_step` (returns the boundary gradient)
  -> `split_edge_backward`, the edge's VJP kept between them as a pytree of residuals.

Precision (hier_jax.precision): the module computes in the dtype it was built with; every builder
takes `precision` (a policy name, normally the model's `.precision`; None leaves the process's
matmul precision alone) and traces its step under that policy's matmul precision. The loss is
float32 whatever the logits' dtype, and what crosses the link does not depend on the policy: the
payload is encoded from float32 features, and split learning sends float32 features and receives a
float32 gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from hier_jax import precision as _precision
from hier_jax import quantization

State = dict[str, Any]
Metrics = dict[str, jax.Array]


def init_state(module: nnx.Module, tx: optax.GradientTransformation) -> tuple[nnx.GraphDef, State]:
    """Split a module into its static graph and a train state (params, BN statistics, optimizer state)."""
    graphdef, params, batch_stats = nnx.split(module, nnx.Param, nnx.BatchStat)
    return graphdef, {
        "params": params,
        "batch_stats": batch_stats,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
    }


def apply(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    batch_stats: nnx.State,
    *args: Any,
    train: bool,
    method: str | None = None,
) -> tuple[Any, nnx.State]:
    """Run the module (or one of its methods) functionally; returns (output, updated BN statistics).

    copy=True gives the module fresh variables at the current trace level, which BatchNorm may then
    update inside jax.grad or jax.vjp.
    """
    module = nnx.merge(graphdef, params, batch_stats, copy=True)
    fn = module if method is None else getattr(module, method)
    out = fn(*args, train=train)
    return out, nnx.state(module, nnx.BatchStat)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy in float32 (bfloat16 logits are cast first)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(logits, -1) == labels)


def _updated(state: State, tx: optax.GradientTransformation, grads: nnx.State, batch_stats: nnx.State) -> State:
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return {
        "params": optax.apply_updates(state["params"], updates),
        "batch_stats": batch_stats,
        "opt_state": opt_state,
        "step": state["step"] + 1,
    }


def _supervised_step(
    graphdef: nnx.GraphDef, tx: optax.GradientTransformation, state: State, inputs: jax.Array, labels: jax.Array
) -> tuple[State, jax.Array, Metrics]:
    """One SGD step of a module whose output is (logits, aux) or logits; returns (state, aux, metrics)."""

    def loss_fn(params, batch_stats):
        out, batch_stats = apply(graphdef, params, batch_stats, inputs, train=True)
        logits, aux = out if isinstance(out, tuple) else (out, None)
        return cross_entropy(logits, labels), (logits, aux, batch_stats)

    (loss, (logits, aux, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], state["batch_stats"]
    )
    return _updated(state, tx, grads, batch_stats), aux, {"loss": loss, "accuracy": accuracy(logits, labels)}


def make_edge_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    bits: int,
    num_classes: int,
    precision: str | None = None,
) -> Callable[[State, jax.Array, jax.Array], tuple[State, quantization.Payload, Metrics]]:
    """(edge_state, images_BHWC, labels_B) -> (edge_state, payload, metrics), early-exit loss only.

    The payload holds the feature map of this step's forward pass (before the update), as the paper's
    edge sends it while it runs its backward pass.
    """
    quantization.check_bits(bits)

    def edge_step(edge_state, images, labels):
        edge_state, features, metrics = _supervised_step(graphdef, tx, edge_state, images, labels)
        return edge_state, quantization.encode(features, labels, bits, num_classes), metrics

    return _precision.traced_under(edge_step, precision)


def make_cloud_step(
    graphdef: nnx.GraphDef, tx: optax.GradientTransformation, *, precision: str | None = None
) -> Callable[[State, quantization.Payload], tuple[State, Metrics]]:
    """(cloud_state, payload) -> (cloud_state, metrics); the labels travel inside the payload."""

    def cloud_step(cloud_state, payload):
        features, labels = quantization.decode(payload)
        cloud_state, _, metrics = _supervised_step(graphdef, tx, cloud_state, features, labels)
        return cloud_state, metrics

    return _precision.traced_under(cloud_step, precision)


def make_train_step(
    graphdef: nnx.GraphDef, tx: optax.GradientTransformation, *, precision: str | None = None
) -> Callable[[State, jax.Array, jax.Array], tuple[State, Metrics]]:
    """(state, images_BHWC, labels_B) -> (state, metrics) for the unsplit model (cloud-only training)."""

    def train_step(state, images, labels):
        state, _, metrics = _supervised_step(graphdef, tx, state, images, labels)
        return state, metrics

    return _precision.traced_under(train_step, precision)


def make_split_edge_forward(graphdef: nnx.GraphDef, *, precision: str | None = None) -> Callable:
    """(edge_state, images) -> (float32 features, edge_vjp, batch_stats) for vanilla split learning."""

    def split_edge_forward(edge_state, images):
        def forward(params):
            features, batch_stats = apply(
                graphdef, params, edge_state["batch_stats"], images, train=True, method="features"
            )
            return features.astype(jnp.float32), batch_stats

        features, edge_vjp, batch_stats = jax.vjp(forward, edge_state["params"], has_aux=True)
        return features, edge_vjp, batch_stats

    return _precision.traced_under(split_edge_forward, precision)


def make_split_cloud_step(
    graphdef: nnx.GraphDef, tx: optax.GradientTransformation, *, precision: str | None = None
) -> Callable:
    """(cloud_state, features, labels) -> (cloud_state, boundary_grad, metrics) for vanilla split learning."""

    def split_cloud_step(cloud_state, features, labels):
        def loss_fn(params, features, batch_stats):
            logits, batch_stats = apply(graphdef, params, batch_stats, features, train=True)
            return cross_entropy(logits, labels), (logits, batch_stats)

        (loss, (logits, batch_stats)), (grads, boundary_grad) = jax.value_and_grad(
            loss_fn, argnums=(0, 1), has_aux=True
        )(cloud_state["params"], features, cloud_state["batch_stats"])
        metrics = {"loss": loss, "accuracy": accuracy(logits, labels)}
        return _updated(cloud_state, tx, grads, batch_stats), boundary_grad, metrics

    return _precision.traced_under(split_cloud_step, precision)


def make_split_edge_backward(tx: optax.GradientTransformation, *, precision: str | None = None) -> Callable:
    """(edge_state, edge_vjp, batch_stats, boundary_grad) -> edge_state: backpropagate the cloud's gradient."""

    def split_edge_backward(edge_state, edge_vjp, batch_stats, boundary_grad):
        (grads,) = edge_vjp(boundary_grad)
        return _updated(edge_state, tx, grads, batch_stats)

    return _precision.traced_under(split_edge_backward, precision)


def make_edge_eval(graphdef: nnx.GraphDef, *, bits: int, num_classes: int, precision: str | None = None) -> Callable:
    """(edge_state, images) -> (exit_logits, payload): inference mode, running BN statistics."""

    def edge_eval(edge_state, images):
        (logits, features), _ = apply(graphdef, edge_state["params"], edge_state["batch_stats"], images, train=False)
        labels = jnp.zeros(images.shape[:1], jnp.int32)
        return logits, quantization.encode(features, labels, bits, num_classes)

    return _precision.traced_under(edge_eval, precision)


def make_cloud_eval(graphdef: nnx.GraphDef, *, precision: str | None = None) -> Callable:
    """(cloud_state, payload) -> logits of the final classifier on the dequantized features."""

    def cloud_eval(cloud_state, payload):
        features, _ = quantization.decode(payload)
        logits, _ = apply(graphdef, cloud_state["params"], cloud_state["batch_stats"], features, train=False)
        return logits

    return _precision.traced_under(cloud_eval, precision)


def make_features_eval(graphdef: nnx.GraphDef, *, precision: str | None = None) -> Callable:
    """(edge_state, images) -> the edge's float32 feature map in inference mode (split learning sends it as is)."""

    def features_eval(edge_state, images):
        features, _ = apply(
            graphdef, edge_state["params"], edge_state["batch_stats"], images, train=False, method="features"
        )
        return features.astype(jnp.float32)

    return _precision.traced_under(features_eval, precision)


def make_eval(graphdef: nnx.GraphDef, *, precision: str | None = None) -> Callable:
    """(state, images) -> logits of the unsplit model in inference mode."""

    def eval_fn(state, images):
        logits, _ = apply(graphdef, state["params"], state["batch_stats"], images, train=False)
        return logits

    return _precision.traced_under(eval_fn, precision)
