"""Backbones, stage names, the split and its exact equivalence with the unsplit forward pass."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hier_jax.models import ExitHeadConfig, build_model, param_count, split
from hier_jax.models.split import pool_grid


def vgg16_cifar_count() -> int:
    """Hand count: 13 conv (3x3 kernels + bias), 13 BN (scale + bias), one 512->10 linear."""
    channels = [3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    convs = sum(9 * cin * cout + cout for cin, cout in zip(channels[:-1], channels[1:]))
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
    assert resnet.stage_names == ("stem", "layer1_0", "layer1_1", "layer2_0", "layer2_1", "layer3_0", "layer3_1",
                                  "layer4_0", "layer4_1")
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
        np.testing.assert_array_equal(np.asarray(model(images, train=True)),
                                      np.asarray(parts.cloud(parts.edge.features(images, True), True)))


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
    """conftest (like experiments/__init__) hands XLA:CPU convolutions to Eigen; the explicit default
    options must bring YNNPACK back, or bench_torch's "before" variants would measure the wrong thing."""
    from hier_jax.models import layers
    if jax.default_backend() != "cpu" or "xla_cpu_experimental_ynn_fusion_type" not in os.environ["XLA_FLAGS"]:
        pytest.skip("needs XLA:CPU with the YNNPACK fusion option (jaxlib 0.9 / 0.10)")
    assert not layers._ynn_takes_convolutions()
    assert layers._resolved_impl() == "cpu"
    assert layers.hlo_uses_ynn(layers.probe_conv_hlo(layers.XLA_CPU_DEFAULT_COMPILER_OPTIONS))
    assert not layers.hlo_uses_ynn(layers.probe_conv_hlo())


def test_inputs_too_small_for_the_model_are_refused():
    """VGG-16's five 2x2 pools need at least 32x32: 16x16 would reach its classifier as an empty map (NaN loss)."""
    from hier_jax.models import check_input_size

    check_input_size(build_model("vgg16", num_classes=10, input_shape=(32, 32, 3), width=4))
    with pytest.raises(ValueError, match="16x16 images are too small for vgg16: stage pool5"):
        check_input_size(build_model("vgg16", num_classes=10, input_shape=(16, 16, 3), width=4))
