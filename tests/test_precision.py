"""The precision policy (hier_jax.precision, --precision): how each policy resolves, that bf16 computes
in bfloat16 on both sides while parameters, optimizer state and BatchNorm statistics stay float32,
that the matmul precision reaches every traced step, and that the payload does not depend on it."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hier_jax import precision, quantization, steps, train
from hier_jax.config import ExperimentConfig, validate
from hier_jax.errors import ConfigError, ResumeMismatchError
from hier_jax.models import ExitHeadConfig, build_model, split
from hier_jax.optim import OptimConfig, make_optimizer
from hier_jax.run.hierarchy import build_hierarchy
from hier_jax.run.record import check_resumable

NUM_CLASSES = 10
SMALL = ExperimentConfig(
    model="vgg16", dataset="digits", split="pool2", width=4, batch_size=32, max_steps=3, head=ExitHeadConfig(channels=8)
)


def tiny_split(policy: str, point: str = "layer1_1"):
    model = build_model("resnet18", num_classes=NUM_CLASSES, input_shape=(16, 16, 3), width=4, precision=policy)
    return model, split(model, point, ExitHeadConfig(channels=8))


def batch(n: int = 4, seed: int = 0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return jax.random.normal(k1, (n, 16, 16, 3)), jax.random.randint(k2, (n,), 0, NUM_CLASSES)


def tx():
    return make_optimizer(OptimConfig(learning_rate=0.1), total_steps=10)


def float_dtypes(tree) -> set[str]:
    return {str(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


def layer_dtypes(module: nnx.Module) -> set[str]:
    """The compute dtype of every conv, linear and BatchNorm layer in `module`."""
    return {
        str(np.dtype(m.dtype))
        for _, m in nnx.iter_graph(module)
        if isinstance(m, (nnx.Conv, nnx.Linear, nnx.BatchNorm))
    }


# --- resolution -----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend, name", [("cpu", "fp32"), ("gpu", "fp32"), ("tpu", "bf16")])
def test_auto_resolves_per_backend(backend, name):
    assert precision.resolve("auto", backend).name == name
    assert precision.resolve("auto").name == precision.AUTO[jax.default_backend()]


@pytest.mark.parametrize(
    "policy, dtype, matmul",
    [("fp32", jnp.float32, "highest"), ("tf32", jnp.float32, "tensorfloat32"), ("bf16", jnp.bfloat16, "default")],
)
def test_each_policy_has_its_dtype_and_matmul_precision(policy, dtype, matmul):
    for backend in ("cpu", "gpu", "tpu"):  # an explicit policy means the same everywhere
        resolved = precision.resolve(policy, backend)
        assert (resolved.name, resolved.compute_dtype, resolved.matmul_precision) == (policy, np.dtype(dtype), matmul)
    assert policy in precision.resolve(policy).describe()


def test_tf32_says_it_is_fp32_off_gpu():
    assert "same numbers as fp32" in precision.resolve("tf32").describe("cpu")
    assert "same numbers as fp32" not in precision.resolve("tf32").describe("gpu")


def test_a_bad_policy_is_rejected_in_one_line():
    with pytest.raises(ValueError, match="unknown precision 'fp16'; valid: auto, fp32, tf32, bf16"):
        precision.resolve("fp16")
    with pytest.raises(ConfigError) as error:
        validate(dataclasses.replace(SMALL, precision="fp16"))
    assert str(error.value) == "--precision 'fp16' is invalid; valid: auto, fp32, tf32, bf16"


def test_the_policy_is_fixed_at_build_time():
    assert build_model("resnet18", num_classes=2, input_shape=(16, 16, 3), width=2).precision == "fp32"
    with precision.building("bf16"):
        assert precision.build_policy().name == "bf16"
        # build_model's own argument wins over the surrounding default, as conv_impl's does
        tf32 = build_model("vgg16", num_classes=2, input_shape=(32, 32, 3), width=2, precision="tf32")
        assert tf32.precision == "tf32"
    assert precision.build_policy().name == precision.DEFAULT
    fp32 = build_model("vgg16", num_classes=2, input_shape=(32, 32, 3), width=2)
    bf16 = build_model("vgg16", num_classes=2, input_shape=(32, 32, 3), width=2, precision="bf16")
    # Part of the GraphDef (static), so a jitted step never reuses code traced for the other.
    assert nnx.graphdef(fp32) != nnx.graphdef(bf16)


# --- bf16 computes in bfloat16, stores float32 -----------------------------------------------------


def test_bf16_activations_are_bfloat16_and_parameters_float32():
    model, parts = tiny_split("bf16")
    images, _ = batch()
    assert layer_dtypes(model) == layer_dtypes(parts.edge) == layer_dtypes(parts.cloud) == {"bfloat16"}
    for stop in range(1, len(model.stage_names) + 1):
        assert jax.eval_shape(lambda x, stop=stop: model.features(x, False, stop=stop), images).dtype == jnp.bfloat16
    logits, features = jax.eval_shape(lambda x: parts.edge(x, False), images)
    assert features.dtype == logits.dtype == jnp.bfloat16
    assert float_dtypes(nnx.state(model)) == {"float32"}  # parameters and BatchNorm statistics
    _, fp32 = tiny_split("fp32")
    assert jax.eval_shape(lambda x: fp32.edge(x, False), images)[1].dtype == jnp.float32


def test_bf16_hierarchical_steps_train_with_float32_state():
    _, parts = tiny_split("bf16")
    hierarchy, edge_state, cloud_state = build_hierarchy(parts, bits=4, edge_tx=tx(), cloud_tx=tx())
    losses = []
    for seed in range(3):
        images, labels = batch(seed=seed)
        edge_state, payload, edge_metrics = hierarchy.edge_step(edge_state, images, labels)
        cloud_state, cloud_metrics = hierarchy.cloud_step(cloud_state, jax.device_put(payload, hierarchy.cloud_device))
        losses += [float(edge_metrics["loss"]), float(cloud_metrics["loss"])]
        assert edge_metrics["loss"].dtype == cloud_metrics["loss"].dtype == jnp.float32
    assert np.all(np.isfinite(losses)), losses
    for state in (edge_state, cloud_state):
        assert float_dtypes(state["params"]) == float_dtypes(state["opt_state"]) == {"float32"}
        assert float_dtypes(state["batch_stats"]) == {"float32"}
    # The BatchNorm running statistics moved (they are updated, in float32).
    initial = build_hierarchy(parts, bits=4, edge_tx=tx(), cloud_tx=tx())[1]["batch_stats"]
    assert not all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(initial), jax.tree.leaves(edge_state["batch_stats"]), strict=False)
    )


def test_batchnorm_normalizes_in_float32_from_float32_statistics():
    """bf16 input, float32 running statistics: the output is the float32 normalization, rounded once
    (flax's default would round the running mean and variance to bfloat16 first)."""
    rngs = nnx.Rngs(0)
    with precision.building("bf16"):
        from hier_jax.models.layers import batch_norm

        bn = batch_norm(3, rngs)
    bn.mean[...] = jnp.asarray([100.2, -3.3, 0.1234567])  # 100.2 is 100.0 in bfloat16
    bn.var[...] = jnp.asarray([1e-3, 2.0, 7.7])
    x = (bn.mean[...] + jnp.asarray([[0.3, 1.0, -2.0]])).astype(jnp.bfloat16)  # 100.5 is exact
    y = bn(x, use_running_average=True)
    want = (x.astype(jnp.float32) - bn.mean[...]) / jnp.sqrt(bn.var[...] + bn.epsilon)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(want), rtol=2**-8, atol=1e-6)
    assert bn.mean[...].dtype == bn.var[...].dtype == jnp.float32
    bn(x, use_running_average=False)
    assert bn.mean[...].dtype == bn.var[...].dtype == jnp.float32


# --- the CPU formulations in bfloat16 ---------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        (4, 16, 16, 3, 8, 3, 1),  # Eigen / lax
        (2, 32, 32, 4, 8, 3, 2),  # polyphase input gradient
        (16, 32, 32, 32, 32, 3, 1),  # cpu-ynn's chunked im2col weight gradient
        (4, 8, 8, 8, 16, 1, 2),  # 1x1 strided: slice + matmul
        (4, 2, 2, 16, 32, 3, 2),
    ],
)  # dense product
def test_cpu_convolution_paths_in_bf16_round_the_float32_result_once(case):
    """bf16 inputs: each formulation's output and gradients are bfloat16 and equal the float32
    computation on the same (bf16) values, rounded once: float32 accumulation, as lax does on CPU."""
    from hier_jax.models import xla_cpu

    b, h, w, ci, co, k, s = case
    p = k // 2
    rng = np.random.RandomState(11)
    x, kern = (jnp.asarray(rng.randn(*shape), jnp.bfloat16) for shape in ((b, h, w, ci), (k, k, ci, co)))
    ct = jnp.asarray(rng.randn(b, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1, co), jnp.bfloat16)
    dn = ("NHWC", "HWIO", "NHWC")

    def results(impl, dtype):
        def conv(x_, k_):
            return xla_cpu.conv_general_dilated(x_, k_, (s, s), ((p, p), (p, p)), dimension_numbers=dn, impl=impl)

        y, vjp = jax.vjp(conv, x.astype(dtype), kern.astype(dtype))
        return (y, *vjp(ct.astype(dtype)))

    want = jax.jit(lambda: results("xla", jnp.float32))()
    for impl in ("xla", "cpu", "cpu-ynn"):
        got = jax.jit(lambda impl=impl: results(impl, jnp.bfloat16))()
        for what, a, e in zip(("output", "input grad", "kernel grad"), got, want, strict=False):
            assert a.dtype == jnp.bfloat16, (impl, what)
            e = np.asarray(e)
            np.testing.assert_allclose(
                np.asarray(a, np.float32), e, rtol=2**-8, atol=1e-5 * np.abs(e).max(), err_msg=f"{impl} {what}"
            )


def test_block_max_pool_keeps_bf16_exactly():
    from hier_jax.models import xla_cpu

    x = jnp.asarray(np.random.RandomState(12).randn(2, 8, 8, 3), jnp.bfloat16)
    y, vjp = jax.vjp(lambda x_: xla_cpu.block_max_pool(x_, 2), x)
    (dx,) = vjp(jnp.ones_like(y))
    assert y.dtype == dx.dtype == jnp.bfloat16
    y32, vjp32 = jax.vjp(lambda x_: xla_cpu.block_max_pool(x_, 2), x.astype(jnp.float32))
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y32))
    np.testing.assert_array_equal(np.asarray(dx, np.float32), np.asarray(vjp32(jnp.ones_like(y32))[0]))


# --- the policy reaches both sides and every scheme ----------------------------------------------


@pytest.mark.slow
def test_train_build_gives_both_sides_and_the_baselines_the_policy(digits):
    setup = train.build(dataclasses.replace(SMALL, precision="bf16"), digits)
    assert setup.precision == setup.model.precision == "bf16"
    assert setup.split.edge.precision == setup.split.cloud.precision == "bf16"
    assert layer_dtypes(setup.split.edge) == layer_dtypes(setup.split.cloud) == {"bfloat16"}
    images = jnp.zeros((2, *digits.image_shape))
    _, features = jax.eval_shape(lambda x: setup.split.edge(x, False), images)
    assert features.dtype == jnp.bfloat16
    assert jax.eval_shape(lambda f: setup.split.cloud(f, False), features).dtype == jnp.bfloat16
    for scheme in ("hierarchical", "end_to_end", "split_learning"):
        result = train.train(setup, scheme=scheme, progress=False)
        assert np.all(np.isfinite(result.cloud_metrics["loss"])), scheme
        assert float_dtypes((result.edge_state, result.cloud_state)) <= {"float32"}, scheme
    # Split learning's link carries float32 both ways, as the cost model counts it.
    baseline, edge_state, _ = train.build_baseline(setup, "split_learning")
    assert baseline.edge_eval(edge_state, images).dtype == jnp.float32
    assert train.payload_nbytes(setup, "split_learning") == train.payload_nbytes(
        train.build(SMALL, digits), "split_learning"
    )


def matmul_precisions(jaxpr_text: str) -> set[str]:
    return set(re.findall(r"precision=\(Precision\.(\w+), Precision\.\w+\)", jaxpr_text))


@pytest.mark.parametrize("policy, want", [("fp32", {"HIGHEST"}), ("tf32", {"HIGH"})])
def test_the_matmul_precision_reaches_every_dot_and_convolution_of_a_step(policy, want):
    """Forward, backward (the CPU formulation's custom backward included) and eval, whatever the
    process default is (the tests set "highest"; the steps set their own)."""
    model, parts = tiny_split(policy)
    images, labels = batch()
    opt = tx()
    edge_graphdef, edge_state = steps.init_state(parts.edge, opt)
    graphdef, state = steps.init_state(model, opt)
    pol = model.precision
    traced = [
        jax.make_jaxpr(steps.make_edge_step(edge_graphdef, opt, bits=4, num_classes=NUM_CLASSES, precision=pol))(
            edge_state, images, labels
        ),
        jax.make_jaxpr(steps.make_train_step(graphdef, opt, precision=pol))(state, images, labels),
        jax.make_jaxpr(steps.make_eval(graphdef, precision=pol))(state, images),
    ]
    for jaxpr in traced:
        assert matmul_precisions(str(jaxpr)) == want
    with jax.default_matmul_precision("bfloat16"):  # a process default never leaks into the step
        assert (
            matmul_precisions(
                str(jax.make_jaxpr(steps.make_train_step(graphdef, opt, precision=pol))(state, images, labels))
            )
            == want
        )


# --- the payload does not depend on the policy ---------------------------------------------------


@pytest.mark.parametrize("bits", [4, 16, 32])
def test_the_payload_has_the_same_bytes_and_dtypes_in_every_precision(bits):
    images, labels = batch()
    seen = {}
    for policy in ("fp32", "tf32", "bf16"):
        _, parts = tiny_split(policy)
        hierarchy, edge_state, _ = build_hierarchy(parts, bits=bits, edge_tx=tx(), cloud_tx=tx())
        _, payload, _ = hierarchy.edge_step(edge_state, images, labels)
        arrays = (payload.data, payload.scale, payload.offset, payload.labels)
        seen[policy] = (
            sum(np.asarray(a).nbytes for a in arrays),
            tuple(str(a.dtype) for a in arrays),
            tuple(a.shape for a in arrays),
            payload.shape,
        )
        assert seen[policy][0] == payload.nbytes
    assert seen["fp32"] == seen["tf32"] == seen["bf16"], seen
    assert seen["bf16"][1][0] == {4: "uint8", 16: "bfloat16", 32: "float32"}[bits]


@pytest.mark.parametrize("bits", [2, 4, 8, 16, 32])
def test_the_round_trip_bound_holds_for_bf16_features(bits):
    """The bound of tests/test_quantization.py on real bf16 edge features (16 and 32 bits: exact,
    every bfloat16 value is a float32 and a bfloat16)."""
    _, parts = tiny_split("bf16")
    images, labels = batch(n=8)
    _, features = parts.edge(images, False)
    assert features.dtype == jnp.bfloat16
    x = features.astype(jnp.float32)
    decoded, _ = quantization.decode(quantization.encode(features, labels, bits, NUM_CLASSES))
    assert decoded.dtype == jnp.float32
    err = float(jnp.abs(decoded - x).max())
    span = float(x.max() - x.min())
    assert err <= {16: 0.0, 32: 0.0}.get(bits, span / (2**bits - 1) / 2 * (1 + 1e-5))


# --- resume ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_checkpoint_of_another_resolved_policy_is_not_resumed(digits, tmp_path, monkeypatch):
    """ "auto" resolved elsewhere (say a TPU: bf16) cannot continue a run that "auto" trained in fp32 here."""
    config = dataclasses.replace(SMALL, max_steps=2)
    train.train(train.build(config, digits), schedule="sequential", progress=False, checkpoint_dir=tmp_path)
    monkeypatch.setitem(precision.AUTO, jax.default_backend(), "bf16")
    elsewhere = train.build(config, digits)
    assert elsewhere.precision == "bf16"
    with pytest.raises(ResumeMismatchError, match="trained in precision fp32, this run's resolves to bf16"):
        train.train(elsewhere, schedule="sequential", progress=False, checkpoint_dir=tmp_path, resume=True)


def test_a_config_recorded_before_the_field_existed_resumes_as_auto(tmp_path):
    recorded = {k: v for k, v in dataclasses.asdict(SMALL).items() if k != "precision"}
    meta = {"config": recorded, "scheme": "hierarchical"}
    args = dict(scheme="hierarchical", precision="fp32", total_steps=None, where=tmp_path)
    check_resumable(meta, config=SMALL, **args)
    with pytest.raises(ResumeMismatchError, match=re.escape("differs in --precision ('bf16' here, 'auto' in the")):
        check_resumable(meta, config=dataclasses.replace(SMALL, precision="bf16"), **args)
