"""The PyTorch reference: weight porting, same outputs, same losses, gradients and updates.

Tolerances are relative to the scale of what is compared (max |reference|), fp32 on both sides:
forward outputs 1e-4, gradients and updated parameters 1e-3 of their scale (training-mode BatchNorm
divides by batch statistics of tiny batches, which amplifies fp32 rounding differences).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hier_jax import quantization, steps
from hier_jax.models import ExitHeadConfig, build_model, layers, param_count, split, xla_cpu
from hier_jax.optim import OptimConfig, make_optimizer

NUM_CLASSES = 10
CIFAR = (32, 32, 3)
# (model, input shape, separation point): every arch, both ResNet stems, a Tiny ImageNet shape.
CASES = [
    ("resnet18", CIFAR, "layer2_0"),
    ("resnet18_tv", CIFAR, "layer1_1"),
    ("vgg16", CIFAR, "pool3"),
    ("resnet18_tv", (64, 64, 3), "layer2_1"),
]


@pytest.fixture(scope="module")
def tr():
    pytest.importorskip("torch")
    import hier_jax.torch_ref as tr

    return tr


def close(actual, expected, rel, what="", floor=1e-12):
    """max |actual - expected| <= rel * max(max |expected|, floor)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = max(np.abs(expected).max(), floor)
    err = np.abs(actual - expected).max() / scale
    assert err <= rel, f"{what}: max error {err:.2e} of scale {scale:.2e} > {rel:.0e}"


def close_trees(actual, expected, rel, what):
    """Leaf by leaf; leaves that are ~0 in theory (a conv bias followed by BatchNorm has zero gradient)
    are measured against the largest leaf's scale instead of their own rounding noise."""
    flat_a, flat_e = nnx.to_flat_state(actual), nnx.to_flat_state(expected)
    floor = rel * max(np.abs(np.asarray(v[...])).max() for _, v in flat_e)
    for (path, a), (path_e, e) in zip(flat_a, flat_e, strict=True):
        assert path == path_e
        close(a[...], e[...], rel, f"{what} {path}", floor=floor)


def forward(module, x, train, method=None):
    """The hier-jax module's output under jit (eager op-by-op execution is slow)."""
    graphdef, params, batch_stats = nnx.split(module, nnx.Param, nnx.BatchStat)
    fn = jax.jit(lambda p, b, x: steps.apply(graphdef, p, b, x, train=train, method=method)[0])
    return fn(params, batch_stats, jnp.asarray(x))


def images(shape, n=3, seed=0):
    return np.random.RandomState(seed).randn(n, *shape).astype(np.float32)


def labels(n=3, seed=0):
    return np.random.RandomState(seed + 1).randint(0, NUM_CLASSES, n)


def test_full_width_parameter_counts(tr):
    assert tr.param_count(tr.build_model("resnet18", num_classes=10, input_shape=CIFAR)) == 11_173_962
    assert tr.param_count(tr.build_model("vgg16", num_classes=10, input_shape=CIFAR)) == 14_728_266
    for name, shape, classes in [
        ("resnet18_tv", CIFAR, 10),
        ("resnet18", (64, 64, 3), 200),
        ("vgg16", (64, 64, 3), 200),
    ]:
        abstract = nnx.eval_shape(lambda n=name, c=classes, s=shape: build_model(n, num_classes=c, input_shape=s))
        assert tr.param_count(tr.build_model(name, num_classes=classes, input_shape=shape)) == param_count(abstract)


@pytest.mark.parametrize("name,shape,point", CASES)
def test_ported_model_and_split_parts_give_the_same_outputs(tr, name, shape, point):
    import torch

    model = build_model(name, num_classes=NUM_CLASSES, input_shape=shape, width=8, seed=1)
    parts = split(model, point, ExitHeadConfig(channels=16))
    t_model, t_parts = tr.torch_split_like(parts, model)
    x = images(shape)
    xt = tr.to_torch_images(x)
    assert t_parts.feature_shape == parts.feature_shape and t_model.stage_names == model.stage_names
    # Inference mode: running statistics (ported too).
    t_model.eval()
    t_parts.edge.eval()  # the exit head is not part of the model
    with torch.no_grad():
        close(t_model(xt).numpy(), forward(model, x, False), 1e-4, "model eval")
        logits, features = forward(parts.edge, x, False)
        t_logits, t_features = t_parts.edge(xt)
        close(tr.to_jax_images(t_features), features, 1e-4, "edge features")
        close(t_logits.numpy(), logits, 1e-4, "exit head")
        close(t_parts.cloud(tr.to_torch_images(features)).numpy(), forward(parts.cloud, features, False), 1e-4, "cloud")
    # Training mode: batch statistics.
    t_model.train()
    with torch.no_grad():
        close(t_model(xt).numpy(), forward(model, x, True), 1e-4, "model train")


def test_round_trip_is_exact(tr):
    model = build_model("resnet18", num_classes=NUM_CLASSES, input_shape=CIFAR, width=8, seed=2)
    t_model = tr.torch_model_like(model)
    other = build_model("resnet18", num_classes=NUM_CLASSES, input_shape=CIFAR, width=8, seed=3)
    tr.torch_to_jax(t_model, other)
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(other)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_payload_bytes_match(tr):
    import torch

    feats = np.random.RandomState(4).randn(3, 4, 4, 5).astype(np.float32) * 3
    y = labels()
    for bits in (1, 2, 3, 4, 5, 8, 16, 32):
        jp = quantization.encode(jnp.asarray(feats), jnp.asarray(y), bits, NUM_CLASSES)
        tp = tr.quantization.encode(
            torch.from_numpy(feats.transpose(0, 3, 1, 2)), torch.from_numpy(y), bits, NUM_CLASSES
        )
        assert tp.shape == jp.shape and tp.nbytes == jp.nbytes, bits
        if bits <= 8:
            np.testing.assert_array_equal(tp.data.numpy(), np.asarray(jp.data))
        np.testing.assert_array_equal(tp.labels.numpy(), np.asarray(jp.labels))
        decoded, _ = quantization.decode(jp)
        t_decoded, t_labels = tr.quantization.decode(tp)
        np.testing.assert_allclose(tr.to_jax_images(t_decoded), decoded, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(t_labels.numpy(), y)


def test_bf16_features_give_the_float32_payload_on_both_sides(tr):
    """Under autocast (bench_torch --precision bf16) the edge's features are bfloat16: both encoders
    take them as float32 first, so the payload is the one the float32 values give."""
    import torch

    feats = (np.random.RandomState(5).randn(3, 4, 4, 5) * 3).astype(jnp.bfloat16).astype(np.float32)
    y = labels()
    for bits in (4, 16, 32):
        t_feats = torch.from_numpy(feats.transpose(0, 3, 1, 2))
        tp32 = tr.quantization.encode(t_feats, torch.from_numpy(y), bits, NUM_CLASSES)
        tp16 = tr.quantization.encode(t_feats.to(torch.bfloat16), torch.from_numpy(y), bits, NUM_CLASSES)
        jp16 = quantization.encode(jnp.asarray(feats, jnp.bfloat16), jnp.asarray(y), bits, NUM_CLASSES)
        assert tp16.nbytes == tp32.nbytes == jp16.nbytes, bits
        for a, b in [(tp16.data, tp32.data), (tp16.scale, tp32.scale), (tp16.offset, tp32.offset)]:
            assert a.dtype == b.dtype and torch.equal(a, b), bits


def test_schedules_match_optax(tr):
    for config in [OptimConfig(), OptimConfig(warmup_steps=3), OptimConfig(lr_schedule="constant")]:
        tx = make_optimizer(config, total_steps=10)
        fn = tr.schedule_fn(config, 10)
        # optax's schedule sits in the sgd's scale_by_learning_rate; recover it from one update of g = 1.
        state = tx.init({"w": jnp.zeros(())})
        for t in range(12):
            updates, state_next = tx.update({"w": jnp.ones(())}, state, {"w": jnp.zeros(())})
            momentum_buffer = sum(config.momentum**k for k in range(t + 1))
            lr = -float(updates["w"]) / momentum_buffer
            np.testing.assert_allclose(lr, config.learning_rate * fn(t), rtol=1e-5, atol=1e-8, err_msg=str(t))
            state = state_next


LR, WD = 1.0, 5e-4  # a large step keeps the gradient recovered from the update clear of rounding


def grads_from_update(old, new):
    """First SGD step from a zero momentum buffer: new = old - LR * (grad + WD * old)."""
    return jax.tree.map(
        lambda o, n: (np.asarray(o, np.float64) - np.asarray(n, np.float64)) / LR - WD * np.asarray(o, np.float64),
        old,
        new,
    )


def torch_grads_as_jax(tr, t_module, j_module):
    """The .grad of every PyTorch parameter, in hier-jax layout, as an nnx Param state."""
    import torch

    with torch.no_grad():
        saved = [p.detach().clone() for p in t_module.parameters()]
        for p in t_module.parameters():
            p.copy_(p.grad)
    clone = nnx.clone(j_module)
    tr.torch_to_jax(t_module, clone)
    with torch.no_grad():
        for p, s in zip(t_module.parameters(), saved, strict=False):
            p.copy_(s)
    return nnx.state(clone, nnx.Param)


def compare_states(tr, j_module, t_module, rel, what):
    """Params and BatchNorm statistics of a hier-jax module against its PyTorch twin after training.

    PyTorch moves running_var toward the unbiased batch variance, Flax toward the biased one; undo
    the factor n / (n - 1) on the batch part before comparing (see torch_ref/models.py)."""
    from torch import nn

    ported = tr.torch_to_jax(t_module, nnx.clone(j_module))
    close_trees(nnx.state(ported, nnx.Param), nnx.state(j_module, nnx.Param), rel, f"{what} param")
    for path, node in nnx.iter_graph(j_module):
        if isinstance(node, nnx.BatchNorm):
            bn = t_module
            for key in path:
                bn = bn[key] if isinstance(key, int) else getattr(bn, key)
            assert isinstance(bn, nn.BatchNorm2d)
            close(bn.running_mean.numpy(), node.mean[...], rel, f"{what} running mean {path}")
            assert bn.num_batches_tracked.item() == 1
            # One update from var0 = 1: PyTorch 0.9 + 0.1 * v * n / (n - 1), Flax 0.9 + 0.1 * v, with the
            # same n = B*H*W for every channel of the layer.
            torch_batch_var = (bn.running_var.numpy() - 0.9) / 0.1
            flax_batch_var = (np.asarray(node.var[...]) - 0.9) / 0.1
            ratio = torch_batch_var / np.maximum(flax_batch_var, 1e-12)
            assert 1.0 < ratio.mean() <= 2.0, f"{what} running var factor {ratio.mean()} at {path}"
            close(ratio, np.full_like(ratio, ratio.mean()), 1e-3, f"{what} running var {path}")


@pytest.mark.slow  # three models trained one step in both frameworks: the longest equivalence test
@pytest.mark.parametrize("name,shape,point", CASES[:3])
def test_one_step_same_loss_gradients_and_update(tr, name, shape, point):
    """Edge, cloud and end-to-end steps: loss, gradients, parameters and BN statistics after one step."""
    import torch

    config = OptimConfig(learning_rate=LR, weight_decay=WD, lr_schedule="constant")
    tx = make_optimizer(config, total_steps=10)
    x, y = images(shape, n=4, seed=5), labels(n=4, seed=5)
    xt, yt = tr.to_torch_images(x), torch.from_numpy(y).long()

    # --- edge and cloud (hierarchical step pair), 32-bit payload so the cloud sees the same features.
    model = build_model(name, num_classes=NUM_CLASSES, input_shape=shape, width=8, seed=6)
    parts = split(model, point, ExitHeadConfig(channels=16), seed=7)
    t_model, t_parts = tr.torch_split_like(parts, model)
    t_parts.edge.train()
    t_parts.cloud.train()
    e_graphdef, e_state = steps.init_state(parts.edge, tx)
    c_graphdef, c_state = steps.init_state(parts.cloud, tx)
    e_new, payload, e_metrics = jax.jit(steps.make_edge_step(e_graphdef, tx, bits=32, num_classes=NUM_CLASSES))(
        e_state, jnp.asarray(x), jnp.asarray(y)
    )
    features, _ = quantization.decode(payload)
    c_new, c_metrics = jax.jit(steps.make_cloud_step(c_graphdef, tx))(c_state, payload)
    e_grads = grads_from_update(e_state["params"], e_new["params"])
    c_grads = grads_from_update(c_state["params"], c_new["params"])

    e_opt, e_sched = tr.make_optimizer(t_parts.edge, config, 10)
    c_opt, c_sched = tr.make_optimizer(t_parts.cloud, config, 10)
    edge_step = tr.EdgeStep(
        t_parts.edge, e_opt, e_sched, bits=32, num_classes=NUM_CLASSES, feature_shape=t_parts.feature_shape
    )
    cloud_step = tr.CloudStep(t_parts.cloud, c_opt, c_sched)
    t_payload, te_metrics = edge_step(xt, yt)
    close(te_metrics["loss"].item(), e_metrics["loss"], 1e-5, "edge loss")
    t_e_grads = torch_grads_as_jax(tr, t_parts.edge, parts.edge)
    tc_metrics = cloud_step(t_payload)
    close(tc_metrics["loss"].item(), c_metrics["loss"], 1e-5, "cloud loss")
    t_c_grads = torch_grads_as_jax(tr, t_parts.cloud, parts.cloud)
    close(tr.to_jax_images(tr.quantization.decode(t_payload)[0]), features, 1e-4, "payload features")
    close_trees(t_e_grads, e_grads, 1e-3, "edge grad")
    close_trees(t_c_grads, c_grads, 1e-3, "cloud grad")
    nnx.update(parts.edge, e_new["params"], e_new["batch_stats"])
    nnx.update(parts.cloud, c_new["params"], c_new["batch_stats"])
    compare_states(tr, parts.edge, t_parts.edge, 1e-3, "edge")
    compare_states(tr, parts.cloud, t_parts.cloud, 1e-3, "cloud")

    # --- end-to-end step of the unsplit model.
    model = build_model(name, num_classes=NUM_CLASSES, input_shape=shape, width=8, seed=8)
    t_model = tr.torch_model_like(model)
    t_model.train()
    graphdef, state = steps.init_state(model, tx)
    new, metrics = jax.jit(steps.make_train_step(graphdef, tx))(state, jnp.asarray(x), jnp.asarray(y))
    grads = grads_from_update(state["params"], new["params"])
    opt, sched = tr.make_optimizer(t_model, config, 10)
    t_metrics = tr.TrainStep(t_model, opt, sched)(xt, yt)
    close(t_metrics["loss"].item(), metrics["loss"], 1e-5, "end-to-end loss")
    close(t_metrics["accuracy"].item(), metrics["accuracy"], 0, "end-to-end accuracy")
    close_trees(torch_grads_as_jax(tr, t_model, model), grads, 1e-3, "end-to-end grad")
    nnx.update(model, new["params"], new["batch_stats"])
    compare_states(tr, model, t_model, 1e-3, "end-to-end")


@pytest.mark.slow
def test_quantized_cloud_step_consumes_the_same_bytes(tr):
    """At 4 bits the edge payloads are equal byte for byte, so the cloud losses agree too."""
    import torch

    model = build_model("resnet18_tv", num_classes=NUM_CLASSES, input_shape=CIFAR, width=8, seed=9)
    parts = split(model, "layer1_1", ExitHeadConfig(channels=16))
    t_model, t_parts = tr.torch_split_like(parts, model)
    t_parts.edge.train()
    t_parts.cloud.train()
    tx = make_optimizer(OptimConfig(), total_steps=10)
    x, y = images(CIFAR, n=4, seed=10), labels(n=4, seed=10)
    e_graphdef, e_state = steps.init_state(parts.edge, tx)
    _, payload, _ = jax.jit(steps.make_edge_step(e_graphdef, tx, bits=4, num_classes=NUM_CLASSES))(
        e_state, jnp.asarray(x), jnp.asarray(y)
    )
    opt, sched = tr.make_optimizer(t_parts.edge, OptimConfig(), 10)
    t_payload, _ = tr.EdgeStep(
        t_parts.edge, opt, sched, bits=4, num_classes=NUM_CLASSES, feature_shape=t_parts.feature_shape
    )(tr.to_torch_images(x), torch.from_numpy(y))
    codes = np.asarray(quantization.unpack_bits(payload.data, 4, int(np.prod(payload.shape))))
    t_codes = tr.quantization.unpack_bits(t_payload.data, 4, int(np.prod(payload.shape))).numpy()
    # fp32 rounding may move a value sitting on a rounding boundary by one code; nothing more.
    assert np.abs(codes.astype(int) - t_codes.astype(int)).max() <= 1
    assert np.mean(codes != t_codes) < 1e-3
    c_graphdef, c_state = steps.init_state(parts.cloud, tx)
    _, c_metrics = jax.jit(steps.make_cloud_step(c_graphdef, tx))(c_state, payload)
    opt, sched = tr.make_optimizer(t_parts.cloud, OptimConfig(), 10)
    close(tr.CloudStep(t_parts.cloud, opt, sched)(t_payload)["loss"].item(), c_metrics["loss"], 1e-4, "cloud loss")


@pytest.mark.parametrize(
    "case",
    [
        (4, 32, 32, 3, 8, 3, 1),  # Eigen / lax
        (2, 32, 32, 4, 8, 3, 2),  # strided on a 32x32 map: polyphase input gradient
        (16, 32, 32, 32, 32, 3, 1),  # large enough for cpu-ynn's chunked im2col weight gradient (lax.scan)
        (12, 16, 16, 8, 16, 3, 2),
        (4, 8, 8, 8, 16, 1, 2),  # 1x1 strided: slice + matmul
        (3, 64, 64, 3, 8, 7, 2),  # the torchvision stem
        (4, 2, 2, 16, 16, 3, 1),
        (4, 1, 1, 16, 16, 3, 1),
        (4, 2, 2, 16, 32, 3, 2),  # dense product
        (3, 5, 7, 4, 6, 3, 2),
    ],
)
def test_cpu_convolution_paths_match_lax(case):
    """hier_jax.models.xla_cpu's formulations: same values and gradients as lax.conv (no torch)."""
    b, h, w, ci, co, k, s = case
    p = k // 2
    rng = np.random.RandomState(11)
    x, kern = jnp.asarray(rng.randn(b, h, w, ci), jnp.float32), jnp.asarray(rng.randn(k, k, ci, co), jnp.float32)
    ct = jnp.asarray(rng.randn(b, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1, co), jnp.float32)
    dn = jax.lax.conv_dimension_numbers(x.shape, kern.shape, ("NHWC", "HWIO", "NHWC"))
    results = {}
    for impl in ("xla", "cpu", "cpu-ynn"):

        def conv(x_, k_, impl=impl):
            return xla_cpu.conv_general_dilated(x_, k_, (s, s), ((p, p), (p, p)), dimension_numbers=dn, impl=impl)

        y = jax.jit(conv)(x, kern)
        grads = jax.jit(jax.grad(lambda x_, k_, conv=conv: jnp.sum(conv(x_, k_) * ct), (0, 1)))(x, kern)
        results[impl] = (y, *grads)
    for impl in ("cpu", "cpu-ynn"):
        for what, a, e in zip(("output", "input grad", "kernel grad"), results[impl], results["xla"], strict=False):
            close(a, e, 1e-5, f"{impl} {what}")


@pytest.mark.parametrize("shape,window", [((2, 8, 8, 3), 2), ((2, 6, 6, 2), 3)])
def test_block_max_pool_matches_lax_including_ties(shape, window):
    """Non-overlapping max-pool on CPU: same output, and the gradient goes to the first maximum of
    each window in row-major order, as lax's select-and-scatter (and PyTorch) route it."""
    x = jnp.asarray(np.random.RandomState(12).randn(*shape), jnp.float32)
    x = jax.nn.relu(jnp.round(x * 2) / 2)  # many ties, zeros above all
    out = {}
    for impl in ("xla", "cpu"):
        with xla_cpu.conv_impl(impl):
            pool = layers.MaxPool(window, window)
        y = jax.jit(lambda x_, pool=pool: pool(x_, True))(x)
        ct = jnp.asarray(np.random.RandomState(13).randn(*y.shape), jnp.float32)
        grad = jax.jit(jax.grad(lambda x_, pool=pool, ct=ct: jnp.sum(pool(x_, True) * ct)))(x)
        out[impl] = (y, grad)
    for a, e in zip(out["cpu"], out["xla"], strict=False):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))
