"""Checkpoints: both states and their metadata round-trip onto the template's devices, bit for bit
(a resumed run continuing from them is tested whole in tests/test_resume.py)."""

import jax
import numpy as np

from hier_jax import devices
from hier_jax.models import ExitHeadConfig, build_model, split
from hier_jax.optim import OptimConfig, make_optimizer
from hier_jax.run import hierarchy
from hier_jax.run.checkpoint import RunCheckpoints


def test_states_and_metadata_round_trip_onto_the_templates_devices(tmp_path):
    model = build_model("vgg16", num_classes=10, input_shape=(32, 32, 3), width=4)
    tx = make_optimizer(OptimConfig(), total_steps=5)
    h, edge0, cloud0 = hierarchy.build_hierarchy(
        split(model, "pool2", ExitHeadConfig(channels=8)), bits=4, edge_tx=tx, cloud_tx=tx
    )
    rng = np.random.default_rng(0)

    def copies():
        return devices.place(edge0, h.edge_device), devices.place(cloud0, h.cloud_device)

    edge_state, cloud_state = copies()
    for _ in range(3):
        images = rng.normal(size=(4, 32, 32, 3)).astype(np.float32)
        edge_state, payload, _ = h.edge_step(edge_state, images, rng.integers(0, 10, 4).astype(np.int32))
        cloud_state, _ = h.cloud_step(cloud_state, jax.device_put(payload, h.cloud_device))
    with RunCheckpoints(tmp_path / "ckpt") as checkpoints:
        checkpoints.save(3, {"0": edge_state}, cloud_state, {"step": 3, "note": "three steps"})
    with RunCheckpoints(tmp_path / "ckpt", read_only=True) as checkpoints:
        template_edge, template_cloud = copies()
        edges, cloud, meta = checkpoints.restore({"0": template_edge}, template_cloud)
    assert meta == {"step": 3, "note": "three steps"}
    edge = edges["0"]
    assert int(edge["step"]) == 3 and int(cloud["step"]) == 3
    assert {d for x in jax.tree.leaves(cloud) for d in x.devices()} == {h.cloud_device}
    assert {d for x in jax.tree.leaves(edge) for d in x.devices()} == {h.edge_device}
    for a, b in ((edge_state, edge), (cloud_state, cloud)):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(x, y)


def test_only_the_latest_checkpoints_are_kept(tmp_path):
    state = {"w": jax.numpy.ones(3)}
    with RunCheckpoints(tmp_path, keep=2) as checkpoints:
        for step in (1, 2, 3):
            checkpoints.save(step, state, state, {"step": step})
        assert checkpoints.steps() == [2, 3] and checkpoints.latest_step() == 3
