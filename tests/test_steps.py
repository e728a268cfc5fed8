"""The pure steps: gradient isolation at the boundary, and the baselines' math."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from hier_jax import quantization, steps
from hier_jax.models import ExitHeadConfig, build_model, split
from hier_jax.optim import OptimConfig, make_optimizer
from hier_jax.run import baselines

from backend import tolerance

NUM_CLASSES = 10


def tiny_split(point="layer1_1", head=ExitHeadConfig(channels=8), seed=0):
    model = build_model("resnet18", num_classes=NUM_CLASSES, input_shape=(16, 16, 3), width=4, seed=seed)
    return model, split(model, point, head, seed=seed)


def batch(seed=0, n=4):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return jax.random.normal(k1, (n, 16, 16, 3)), jax.random.randint(k2, (n,), 0, NUM_CLASSES)


def tx():
    return make_optimizer(OptimConfig(learning_rate=0.1, weight_decay=5e-4), total_steps=10)


def assert_trees_close(a, b, **kw):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


def test_edge_update_is_the_early_exit_loss_alone():
    """The edge step equals one optax step on the exit loss computed independently with NNX."""
    _, parts = tiny_split()
    images, labels = batch()
    opt = tx()
    graphdef, state = steps.init_state(parts.edge, opt)
    new_state, payload, metrics = jax.jit(steps.make_edge_step(graphdef, opt, bits=4, num_classes=NUM_CLASSES))(
        state, images, labels
    )

    def exit_loss(edge):
        logits, _ = edge(images, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = nnx.value_and_grad(exit_loss)(parts.edge)
    updates, _ = opt.update(grads, opt.init(nnx.state(parts.edge, nnx.Param)), nnx.state(parts.edge, nnx.Param))
    expected = optax.apply_updates(nnx.state(parts.edge, nnx.Param), updates)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=tolerance("reordered").rtol)
    assert_trees_close(new_state["params"], expected, **tolerance("step").kwargs())
    assert int(new_state["step"]) == 1
    # Train-mode BatchNorm moved its running statistics, identically on both paths.
    assert_trees_close(
        new_state["batch_stats"], nnx.state(parts.edge, nnx.BatchStat), **tolerance("reordered").kwargs()
    )
    assert payload.shape == (4, 16, 16, 4) and payload.bits == 4


def cloud_loss_of_edge_params(parts, bits):
    """cloud loss as a function of the edge parameters, through the real hand-off (or none if bits=None)."""
    images, labels = batch(1)
    edge_graphdef, edge_params, edge_stats = nnx.split(parts.edge, nnx.Param, nnx.BatchStat)
    cloud_graphdef, cloud_params, cloud_stats = nnx.split(parts.cloud, nnx.Param, nnx.BatchStat)

    def loss(edge_params):
        (_, features), _ = steps.apply(edge_graphdef, edge_params, edge_stats, images, train=True)
        if bits is not None:
            features, labels_rx = quantization.decode(quantization.encode(features, labels, bits, NUM_CLASSES))
        logits, _ = steps.apply(cloud_graphdef, cloud_params, cloud_stats, features, train=True)
        return steps.cross_entropy(logits, labels)

    return jax.grad(loss)(edge_params)


@pytest.mark.parametrize("bits", [4, 8, 16, 32])
def test_no_gradient_crosses_from_cloud_to_edge(bits):
    _, parts = tiny_split()
    grads = cloud_loss_of_edge_params(parts, bits)
    for leaf in jax.tree.leaves(grads):
        assert not np.any(np.asarray(leaf)), "a cloud gradient reached an edge parameter"


def test_without_the_boundary_the_cloud_loss_does_reach_the_edge():
    """Control for the test above: the same function without encode/decode has nonzero edge gradients."""
    _, parts = tiny_split()
    grads = cloud_loss_of_edge_params(parts, None)
    assert any(np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(grads))


def test_cloud_step_trains_on_decoded_payload():
    _, parts = tiny_split()
    images, labels = batch(2)
    opt = tx()
    eg, es = steps.init_state(parts.edge, opt)
    cg, cs = steps.init_state(parts.cloud, opt)
    _, payload, _ = jax.jit(steps.make_edge_step(eg, opt, bits=8, num_classes=NUM_CLASSES))(es, images, labels)
    new_cs, metrics = jax.jit(steps.make_cloud_step(cg, opt))(cs, payload)
    features, labels_rx = quantization.decode(payload)
    np.testing.assert_array_equal(labels_rx, labels)
    ref_loss = steps.cross_entropy(parts.cloud(features, train=True), labels)
    np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=tolerance("reordered").rtol)
    assert int(new_cs["step"]) == 1


def split_learning_steps(b: baselines.Baseline, edge_state, cloud_state, data):
    """Split learning's three compiled programs in turn, as its workers run them: edge forward, cloud
    step (which returns the boundary gradient), edge backward; each array moved to the side that uses it."""
    assert b.edge_forward is not None and b.cloud_step is not None and b.edge_backward is not None
    edge, cloud = b.edge_device, b.cloud_device
    losses = []
    for images, labels in data:
        features, edge_vjp, batch_stats = b.edge_forward(edge_state, jax.device_put(images, edge))
        cloud_state, boundary_grad, metrics = b.cloud_step(
            cloud_state, jax.device_put(features, cloud), jax.device_put(labels, cloud)
        )
        edge_state = b.edge_backward(edge_state, edge_vjp, batch_stats, jax.device_put(boundary_grad, edge))
        losses.append(float(metrics["loss"]))
    return edge_state, cloud_state, np.array(losses)


def end_to_end_steps(b: baselines.Baseline, state, data):
    assert b.train_step is not None
    losses = []
    for images, labels in data:
        state, metrics = b.train_step(
            state, jax.device_put(images, b.cloud_device), jax.device_put(labels, b.cloud_device)
        )
        losses.append(float(metrics["loss"]))
    return state, np.array(losses)


@pytest.mark.slow
def test_vanilla_split_learning_equals_end_to_end_training():
    """Split learning backpropagates the cloud's boundary gradient: the same math as training the unsplit
    model, so after three steps both give the same parameters (up to float reassociation)."""
    opt = tx()
    model, parts = tiny_split("layer2_0", head=None, seed=3)
    twin = build_model("resnet18", num_classes=NUM_CLASSES, input_shape=(16, 16, 3), width=4, seed=3)
    data = [batch(s) for s in range(3)]
    sl, edge_state, cloud_state = baselines.build_split_learning(parts, edge_tx=opt, cloud_tx=opt)
    edge_state, cloud_state, sl_losses = split_learning_steps(sl, edge_state, cloud_state, data)
    e2e, no_edge, state = baselines.build_end_to_end(twin, opt)
    state, e2e_losses = end_to_end_steps(e2e, state, data)
    assert int(no_edge["step"]) == 0  # end-to-end has no edge: its placeholder state
    near = tolerance("trajectory").kwargs()
    np.testing.assert_allclose(sl_losses, e2e_losses, **near)
    full = nnx.merge(*nnx.split(twin, nnx.Param, nnx.BatchStat)[:1], state["params"], state["batch_stats"])
    edge = nnx.merge(
        *nnx.split(parts.edge, nnx.Param, nnx.BatchStat)[:1],
        edge_state["params"],
        edge_state["batch_stats"],
    )
    np.testing.assert_allclose(
        np.asarray(edge.stages[0].conv.kernel[...]), np.asarray(full.stages[0].conv.kernel[...]), **near
    )
    cloud = nnx.merge(
        *nnx.split(parts.cloud, nnx.Param, nnx.BatchStat)[:1],
        cloud_state["params"],
        cloud_state["batch_stats"],
    )
    np.testing.assert_allclose(
        np.asarray(cloud.classifier.linear.kernel[...]), np.asarray(full.classifier.linear.kernel[...]), **near
    )
    # The edge did learn from the cloud (unlike hierarchical training): its stem moved.
    start = nnx.state(model, nnx.Param)
    assert not np.allclose(
        np.asarray(start["stages"][0]["conv"]["kernel"][...]), np.asarray(edge.stages[0].conv.kernel[...])
    )


def test_edge_step_rejects_bad_bits():
    _, parts = tiny_split()
    graphdef, _ = steps.init_state(parts.edge, tx())
    for bits in (0, 9, 64):
        with pytest.raises(ValueError, match="bits must be one of"):
            steps.make_edge_step(graphdef, tx(), bits=bits, num_classes=NUM_CLASSES)
