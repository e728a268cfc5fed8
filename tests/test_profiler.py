"""Profiler: what it measures on a tiny model, bytes from real payloads, memory, JSON round trip."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hier_jax import quantization, steps
from hier_jax.models import build_model, param_count, split, stage_output_shape
from hier_jax.runtime_model import flops, profiler
from hier_jax.runtime_model.profile import Timing, with_payload_batch


@pytest.fixture(scope="module")
def tiny():
    model = build_model("resnet18_tv", num_classes=5, input_shape=(16, 16, 3), width=4)
    return model, profiler.profile_model(
        model, batch=2, repeats=1, payload_batch=4, progress=False, measure_whole=False
    )


def test_profile_covers_every_stage_head_and_classifier(tiny):
    model, p = tiny
    assert p.stage_names == model.stage_names and len(p.stages) == len(p.splits) == len(model.stage_names)
    assert [s.index for s in p.splits] == list(range(len(p.splits)))
    for t in (*p.stages, p.classifier, *(s.head for s in p.splits)):
        assert t.fwd_s > 0 and t.train_s > 0 and math.isfinite(t.train_s)
    conv = p.stages[0]
    assert 0 < conv.fwd_flops < conv.train_flops
    assert p.batch == 2 and p.payload_batch == 4 and p.device == "cpu:0"


def test_conventional_counts_add_the_padding_taps_once_per_convolution_pass(tiny):
    """The stem (3x3 conv, no input gradient: forward and weight gradient) and a block with the input
    gradient (three passes) against `flops.module_padding_flops` of the same modules; the classifier
    has no convolution."""
    model, p = tiny
    shapes = [(2, *model.input_shape)] + [(2, *stage_output_shape(model, i)) for i in range(len(model.stages))]
    for i, passes in ((0, 2), (3, 3)):
        padding = flops.module_padding_flops(model.stages[i], jax.ShapeDtypeStruct(shapes[i], jnp.float32))
        t = p.stages[i]
        assert padding > 0
        assert t.conventional_fwd_flops == pytest.approx(t.fwd_flops + padding)
        assert t.conventional_train_flops == pytest.approx(t.train_flops + passes * padding)
    assert p.classifier.counted("conventional") == p.classifier.counted("xla")


def test_a_cached_profile_without_conventional_counts_is_measured_again(tiny, tmp_path):
    model, p = tiny
    old = dataclasses.replace(p, classifier=Timing(1.0, 2.0, 3.0, 4.0))
    path = tmp_path / "old.json"
    profiler.save_profile(old, path)
    assert profiler.load_profile(path).classifier.conventional_train_flops is None
    again = profiler.cached_profile(path, lambda: model, batch=2, repeats=1, progress=False, measure_whole=False)
    assert again.classifier.conventional_train_flops is not None
    assert profiler.load_profile(path) == again


def test_bytes_come_from_real_payloads(tiny):
    model, p = tiny
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 16, 16, 3)).astype(np.uint8)
    labels = rng.integers(0, 5, 4)
    assert p.raw_bytes == images.nbytes + labels.astype(np.uint8).nbytes
    s = p.split("layer1_1")
    features = model.features(jnp.asarray(images, jnp.float32), False, stop=s.index + 1)
    assert features.shape[1:] == s.feature_shape
    for bits, nbytes in s.payload_bytes.items():
        assert quantization.encode(features, labels, bits, 5).nbytes == nbytes
    assert s.activation_bytes == quantization.encode(features, labels, 32, 5).nbytes
    assert s.gradient_bytes == features.size * 4
    rebatched = with_payload_batch(p, 8, bits=(4,))
    assert rebatched.split("layer1_1").payload_bytes == {4: quantization.payload_nbytes(s.feature_shape, 8, 4, 5)}
    assert rebatched.raw_bytes == 2 * p.raw_bytes


def test_edge_memory_is_the_sum_of_its_parts(tiny):
    model, p = tiny
    s = p.split("layer2_0")
    edge = split(model, s.index).edge
    assert s.edge_param_bytes == 4 * param_count(edge)
    # residuals of the whole edge's early-exit backward pass, traced at once, per example
    graphdef, params, stats = nnx.split(edge, nnx.Param, nnx.BatchStat)

    def residual_bytes(batch):
        def backward(params, x, y):
            def loss(params):
                (logits, _), _ = steps.apply(graphdef, params, stats, x, train=True)
                return steps.cross_entropy(logits, y)

            return jax.vjp(loss, params)[1]

        out = jax.eval_shape(
            backward,
            params,
            jax.ShapeDtypeStruct((batch, 16, 16, 3), jnp.float32),
            jax.ShapeDtypeStruct((batch,), jnp.int32),
        )
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(out))

    assert s.edge_residual_bytes_per_example == residual_bytes(2) - residual_bytes(1)
    assert s.edge_memory_bytes(10) == (
        3 * s.edge_param_bytes + s.edge_stat_bytes + 10 * s.edge_residual_bytes_per_example
    )


def test_json_round_trip_and_device_transforms(tiny, tmp_path):
    _, p = tiny
    path = tmp_path / "profile.json"
    profiler.save_profile(p, path)
    assert profiler.load_profile(path) == p
    slow = p.scaled(15.6, "edge")
    assert slow.device == "edge" and slow.stages[3].train_s == pytest.approx(15.6 * p.stages[3].train_s)
    assert slow.splits[2].head.fwd_s == pytest.approx(15.6 * p.splits[2].head.fwd_s)
    assert slow.splits[2].payload_bytes == p.splits[2].payload_bytes
    flop_model = p.from_flops(1e9, "1 GFLOP/s")
    assert flop_model.stages[0].train_s == pytest.approx(p.stages[0].conventional_train_flops / 1e9)
    assert p.from_flops(1e9, "x", "xla").stages[0].train_s == pytest.approx(p.stages[0].train_flops / 1e9)
    data = json.loads(path.read_text())
    data["format_version"] = 0
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="format version"):
        profiler.load_profile(path)


def test_bad_inputs(tiny):
    model, p = tiny
    with pytest.raises(ValueError, match="batch >= 1"):
        profiler.profile_model(model, batch=0)
    with pytest.raises(ValueError, match="bits"):
        profiler.profile_model(model, batch=1, bits=(3, 12))
    with pytest.raises(ValueError, match="positive"):
        p.scaled(-1.0, "x")
    with pytest.raises(ValueError, match="no separation point"):
        p.split("fc")


def test_edge_footprint_matches_hand_count():
    """VGG-16 width 4 cut after conv1_1 with a linear-probe head on a 1x1 grid: everything countable by hand."""
    from hier_jax.models import ExitHeadConfig, build_model, split
    from hier_jax.runtime_model.profiler import edge_footprint

    model = build_model("vgg16", num_classes=10, input_shape=(8, 8, 3), width=4)
    parts = split(model, "conv1_1", ExitHeadConfig(convs=0, grid=1))
    fp = edge_footprint(parts, batch=16, bits=4)
    conv_params = 3 * 3 * 3 * 4 + 4 + 2 * 4  # kernel + bias + BN scale/bias
    head_params = 4 * 10 + 10
    assert fp.params == conv_params + head_params
    # 8x8x4 features per image at 4 bits: 128 B each; + float32 scale and offset + uint8 labels.
    assert fp.payload_bytes == 16 * 128 + 8 + 16
    # Memory: 3 copies of the float32 parameters (weights, momentum, gradients) + 8 BN statistics
    # (mean, var) + saved activations, which grow linearly with the batch.
    assert fp.memory_bytes == 3 * 4 * fp.params + 4 * 8 + fp.activation_bytes
    assert edge_footprint(parts, batch=32, bits=4).activation_bytes == 2 * fp.activation_bytes
    # At least the conv output, the BN output and the ReLU mask/output (8x8x4 floats each) per image.
    assert fp.activation_bytes >= 16 * 3 * 8 * 8 * 4 * 4
