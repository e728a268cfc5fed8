"""Backbones, stage names, the split and its exact equivalence with the unsplit forward pass."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hier_jax.models import ExitHeadConfig, build_model, param_count, split
from hier_jax.models.split import pool_grid


def vgg16_cifar_count() -> int:
    """Hand count: 13 conv (3x3 kernels + bias), 13 BN (scale + bias), one 512->10 linear."""
    channels = [3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    convs = sum(9 * cin * cout + cout for cin, cout in zip(channels[:-1], channels[1:], strict=False))
    bns = sum(2 * c for c in channels[1:])
    return convs + bns + 512 * 10 + 10


def test_parameter_counts_match_reference_architectures():
    # 11,173,962: the CIFAR ResNet-18 of kuangliu/pytorch-cifar (3x3 stem, BasicBlock [2,2,2,2], 512->10),
    # the count quoted in the project's core issue; 14,728,266: the hand count above.
    assert vgg16_cifar_count() == 14_728_266
    assert param_count(build_model("resnet18", num_classes=10, input_shape=(32, 32, 3))) == 11_173_962
    assert param_count(build_model("vgg16", num_classes=10, input_shape=(32, 32, 3))) == 14_728_266
    # torchvision stem: a 7x7x3x64 kernel (9,408) replaces the 3x3x3x64 one (1,728).
    assert param_count(build_model("resnet18_tv", num_classes=10, input_shape=(32, 32, 3))) == 11_173_962 - 1728 + 9408
    # Tiny ImageNet: only the classifier grows, 512 x (200 - 10) more weights and 190 more biases.
    assert param_count(build_model("resnet18", num_classes=200, input_shape=(64, 64, 3))) == 11_173_962 + 190 * 513
    assert param_count(build_model("vgg16", num_classes=200, input_shape=(64, 64, 3))) == 14_728_266 + 190 * 513


def test_stage_names():
    vgg = build_model("vgg16", num_classes=10, input_shape=(32, 32, 3), width=4)
    assert vgg.stage_names[:3] == ("conv1_1", "conv1_2", "pool1") and vgg.stage_names[-1] == "pool5"
    assert len(vgg.stage_names) == 13 + 5
    resnet = build_model("resnet18", num_classes=10, input_shape=(32, 32, 3), width=4)
    assert resnet.stage_names == (
        "stem",
        "layer1_0",
        "layer1_1",
        "layer2_0",
        "layer2_1",
        "layer3_0",
        "layer3_1",
        "layer4_0",
        "layer4_1",
    )
    tv = build_model("resnet18_tv", num_classes=10, input_shape=(32, 32, 3), width=4)
    assert tv.stage_names[:2] == ("stem", "maxpool")


@pytest.mark.parametrize("name", ["vgg16", "resnet18", "resnet18_tv"])
def test_split_reproduces_unsplit_forward_at_every_point(name):
    """Edge stages then cloud stages (head left out) == the unsplit model, bit for bit (inference mode)."""
    model = build_model(name, num_classes=10, input_shape=(32, 32, 3), width=4)
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    reference = np.asarray(model(images, train=False))
    for point in model.stage_names:
        parts = split(model, point)
        got = parts.cloud(parts.edge.features(images, False), False)
        np.testing.assert_array_equal(np.asarray(got), reference, err_msg=f"{name} split at {point}")


@pytest.mark.parametrize("name", ["vgg16", "resnet18"])
def test_split_train_mode_matches_unsplit(name):
    """In train mode (batch statistics) the split also equals the unsplit model, on fresh copies."""
    images = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
    for point in (0, 4):
        model = build_model(name, num_classes=10, input_shape=(32, 32, 3), width=4)
        twin = build_model(name, num_classes=10, input_shape=(32, 32, 3), width=4)
        parts = split(twin, point)
        np.testing.assert_array_equal(
            np.asarray(model(images, train=True)), np.asarray(parts.cloud(parts.edge.features(images, True), True))
        )


def test_split_shapes_and_head():
    model = build_model("resnet18", num_classes=10, input_shape=(32, 32, 3), width=8)
    parts = split(model, "layer2_0", ExitHeadConfig(channels=12, convs=1))
    assert parts.feature_shape == (16, 16, 16) and parts.index == 3 and parts.point == "layer2_0"
    logits, features = parts.edge(jnp.zeros((2, 32, 32, 3)), train=False)
    assert logits.shape == (2, 10) and features.shape == (2, 16, 16, 16)
    # Head: 3x3x16x12 conv (no bias) + BN(12) + linear from a 4x4 grid of 12 channels to 10 classes.
    assert param_count(parts.edge.head) == 9 * 16 * 12 + 2 * 12 + 4 * 4 * 12 * 10 + 10
    assert param_count(parts.edge) + param_count(parts.cloud) == param_count(model) + param_count(parts.edge.head)
    probe = split(model, "layer2_0", ExitHeadConfig(convs=0, grid=1))
    assert param_count(probe.edge.head) == 16 * 10 + 10
    # The grid pools cell by cell: a map whose 4 quadrants hold 1, 2, 3, 4 gives exactly those 4 means.
    quad = split(model, "layer2_0", ExitHeadConfig(convs=0, grid=2)).edge.head
    x = jnp.zeros((1, 16, 16, 16)).at[:, :8, :8].set(1).at[:, :8, 8:].set(2).at[:, 8:, :8].set(3).at[:, 8:, 8:].set(4)
    kernel = np.asarray(quad.linear.kernel[...]).reshape(2, 2, 16, 10)
    expected = sum(v * kernel[i, j].sum(0) for (i, j), v in {(0, 0): 1, (0, 1): 2, (1, 0): 3, (1, 1): 4}.items())
    np.testing.assert_allclose(np.asarray(quad(x, False))[0], expected + np.asarray(quad.linear.bias[...]), rtol=1e-5)
    assert split(model, "layer2_0", head=None).edge.head is None


def test_pool_grid_uses_divisors_of_the_map():
    assert pool_grid(32, 32, 4) == (4, 4)
    assert pool_grid(2, 2, 4) == (2, 2)
    assert pool_grid(1, 1, 4) == (1, 1)
    assert pool_grid(6, 7, 4) == (3, 1)
    with pytest.raises(ValueError, match="invalid exit head"):
        split(build_model("vgg16", num_classes=10, input_shape=(32, 32, 3), width=4), 0, ExitHeadConfig(grid=0))


def test_point_by_index_and_errors():
    model = build_model("vgg16", num_classes=10, input_shape=(32, 32, 3), width=4)
    assert split(model, 9).point == "pool3"
    for bad in ("pool9", "", -1, 18, 2.0, True):
        with pytest.raises(ValueError, match="valid points.*conv1_1.*pool5"):
            split(model, bad)


def test_clear_errors_for_bad_models_and_images():
    with pytest.raises(ValueError, match="unknown model 'resnet50'.*vgg16.*resnet18"):
        build_model("resnet50", num_classes=10, input_shape=(32, 32, 3))
    with pytest.raises(ValueError, match="width"):
        build_model("vgg16", num_classes=10, input_shape=(32, 32, 3), width=0)
    model = build_model("resnet18", num_classes=10, input_shape=(32, 32, 3), width=4)
    with pytest.raises(ValueError, match=r"images must have shape \[batch, 32, 32, 3\].*\(2, 28, 28, 3\)"):
        model(jnp.zeros((2, 28, 28, 3)), train=False)
    parts = split(model, "stem")
    with pytest.raises(ValueError, match="images must have shape"):
        parts.edge(jnp.zeros((32, 32, 3)), train=False)


def test_xla_cpu_convolution_option():
    """conftest (like every experiment's main, via process.setup) hands XLA:CPU convolutions to Eigen;
    the explicit default options must bring YNNPACK back, or bench_torch's "before" variants would
    measure the wrong thing."""
    from hier_jax.models import xla_cpu

    if jax.default_backend() != "cpu" or "xla_cpu_experimental_ynn_fusion_type" not in os.environ["XLA_FLAGS"]:
        pytest.skip("needs XLA:CPU with the YNNPACK fusion option (jaxlib 0.9 / 0.10)")
    assert not xla_cpu.ynn_takes_convolutions()
    assert xla_cpu.resolve_impl("auto") == "cpu"
    assert xla_cpu.hlo_uses_ynn(xla_cpu.probe_conv_hlo(xla_cpu.XLA_CPU_DEFAULT_COMPILER_OPTIONS))
    assert not xla_cpu.hlo_uses_ynn(xla_cpu.probe_conv_hlo())


def test_cpu_weight_gradients_read_activations_instead_of_recomputing_them():
    """Two ReLU activations feed convolutions: XLA:CPU must compute each into memory once, for the
    forward convolution and the weight gradient's transpose alike. Without `_read_not_recomputed`
    the transposes recompute the BatchNorm/ReLU/residual chain from the convolution outputs (four
    ReLU fusions feed convolutions here instead of two), which cost ResNet-18 a quarter of its step."""
    import re

    from hier_jax.models import xla_cpu

    if jax.default_backend() != "cpu":
        pytest.skip("XLA:CPU's fusion")

    def conv(a, k):
        return xla_cpu.conv_general_dilated(
            a, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"), impl="cpu"
        )

    def loss(kernels, x):  # a residual block's shape: conv, affine, ReLU, conv, residual add, ReLU, conv
        h = jax.nn.relu(conv(x, kernels[0]) * 1.5 + 0.1)
        h = jax.nn.relu(conv(h, kernels[1]) * 0.5 + h)
        return jnp.sum(conv(h, kernels[2]) ** 2)

    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(8, 16, 16, 8), jnp.float32)
    kernels = tuple(jnp.asarray(rng.randn(3, 3, 8, 8) * 0.1, jnp.float32) for _ in range(3))
    hlo = jax.jit(jax.grad(loss)).lower(kernels, x).compile(compiler_options=xla_cpu.XLA_CPU_COMPILER_OPTIONS).as_text()
    computations = dict(re.findall(r"^%(\S+) .*?\{\n(.*?)\n\}", hlo, re.S | re.M))
    fusions = dict(re.findall(r"%(\S+) = .*? fusion\(.*?calls=%([\w.\-]+)", hlo))
    conv_operands = [o for pair in re.findall(r"= \S+ convolution\(%(\S+), %(\S+)\)", hlo) for o in pair]
    assert len(conv_operands) == 2 * 8  # 3 forward convolutions, 2 input gradients, 3 weight gradients
    relu_fusions = [o for o in conv_operands if o in fusions and "maximum(" in computations[fusions[o]]]
    assert len(relu_fusions) == 2, relu_fusions

    # The loop around x runs zero times and gives x back bit for bit; with a NaN gradient, once.
    for dy in (jnp.ones((1, 1, 1, 1)), jnp.full((1, 1, 1, 1), jnp.nan)):
        np.testing.assert_array_equal(jax.jit(xla_cpu._read_not_recomputed)(x, dy), x)


def test_the_formulation_is_fixed_when_the_model_is_built():
    """Changing the default after a build must not change what the built model computes, and models
    built with different formulations must differ in their GraphDef (what jitted steps close over), so
    no jit cache can hand one model's code to the other."""
    from flax import nnx

    from hier_jax.models import xla_cpu

    images = jnp.zeros((2, 32, 32, 3))

    def build(impl):
        return build_model("vgg16", num_classes=10, input_shape=(32, 32, 3), width=2, conv_impl=impl)

    def hlo(model):
        graphdef, state = nnx.split(model)
        return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, train=False)).lower(state, images).as_text()

    plain, fast = build("xla"), build("cpu")
    assert (plain.conv_impl, fast.conv_impl) == ("xla", "cpu")
    assert nnx.graphdef(plain) != nnx.graphdef(fast)
    assert nnx.graphdef(build("cpu")) == nnx.graphdef(fast)  # equal by value: caches keyed on it still hit
    before = hlo(fast)
    assert before != hlo(plain)  # the dense 2x2 convolutions and block pooling show in the lowering
    with xla_cpu.conv_impl("xla"):
        assert hlo(fast) == before
        assert split(fast, "pool2").edge.head.convs[0].conv.conv_general_dilated.impl == "cpu"
    with pytest.raises(ValueError, match="convolution implementation 'gpu'"):
        build("gpu")


def test_a_slow_xla_cpu_is_warned_about_once(monkeypatch):
    """Where the Eigen option cannot be set and YNNPACK runs the convolutions, resolving "auto" on CPU
    warns once, naming the cause and the cost; it still resolves to the YNNPACK-friendly path."""
    from hier_jax.models import xla_cpu

    if jax.default_backend() != "cpu":
        pytest.skip("the warning concerns XLA:CPU")
    monkeypatch.setattr(xla_cpu, "ynn_takes_convolutions", lambda: True)
    monkeypatch.setattr(xla_cpu, "_flags_missing_because", ["jax 0.11.0 has no XLA:CPU option"])
    xla_cpu._warn_slow_once.cache_clear()
    with pytest.warns(RuntimeWarning, match=r"jax 0\.11\.0 has no XLA:CPU option.*1\.3-1\.4x slower"):
        assert xla_cpu.resolve_impl("auto") == "cpu-ynn"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert xla_cpu.resolve_impl("auto") == "cpu-ynn"
    xla_cpu._warn_slow_once.cache_clear()


def test_process_setup_runs_only_when_called():
    """Importing the experiments and the library starts no JAX backend and sets no flag; the process
    set-up is each main's first call (here: a fresh interpreter, so conftest's set-up does not count)."""
    code = (
        "import os, experiments, experiments.train, experiments.paper, experiments.bench_torch\n"
        "from jax._src import xla_bridge\n"
        "assert not xla_bridge.backends_are_initialized()\n"
        "assert 'xla_force_host' not in os.environ.get('XLA_FLAGS', ''), os.environ.get('XLA_FLAGS')\n"
        "from hier_jax import process\n"
        "process.setup()\n"
        "import jax\n"
        "print(len(jax.devices('cpu')), os.environ['XLA_FLAGS'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.returncode == 0, out.stderr[-2000:]
    count, flags = out.stdout.split(maxsplit=1)
    assert count == "2" and "xla_force_host_platform_device_count=2" in flags


def test_inputs_too_small_for_the_model_are_refused():
    """VGG-16's five 2x2 pools need at least 32x32: 16x16 would reach its classifier as an empty map (NaN loss)."""
    from hier_jax.models import check_input_size

    check_input_size(build_model("vgg16", num_classes=10, input_shape=(32, 32, 3), width=4))
    with pytest.raises(ValueError, match="16x16 images are too small for vgg16: stage pool5"):
        check_input_size(build_model("vgg16", num_classes=10, input_shape=(16, 16, 3), width=4))
